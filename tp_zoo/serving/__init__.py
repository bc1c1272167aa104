"""Serving: many requests at once on one sharded model.

- `engine`: continuous batching over a paged KV cache (`pages`): every
  iteration finished sequences leave and waiting ones join, prompts are fed
  in chunks, each request samples by its own settings (`requests`).
- `server`: the OpenAI-compatible HTTP API over engines (`tp-zoo serve`), its
  wire format (bodies, answers, errors) in `openai_api`.
"""
