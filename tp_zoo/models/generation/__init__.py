"""Text generation for `DecoderCausalLM`: one prefill, then one step per token.

A call is one compiled program per (batch, prompt bucket, cache bucket):

1. Prefill: every prompt, right padded, runs through the backbone once from
   position 0, writing its keys and values into per-layer caches of
   (batch, kv heads, length, head_dim), split over the devices by kv heads.
   Attention there is flash-style (cuDNN on GPUs, blockwise elsewhere), and
   the LM head sees only each row's last token, so memory grows linearly
   with the prompt.
2. Decode: each row carries its own position (its prompt length, then +1
   per step), so rows of different lengths step together from their own
   ends: a batch costs one step per new token of its longest budget,
   whatever the spread of its prompt lengths. Each step writes the row's
   new key/value in place and reads the row's cache once (`decode_step` in
   `attention_ops`).

Streaming (`stream_ids`, `generate(..., stream=True)`) runs the same two
passes as two programs: the prefill and first tokens, then up to
STREAM_STEPS decode steps per call, the caches and each row's step carried
from call to call, so the decode loop stays compiled and text shows as it is
made.

Conversations are rendered with the checkpoint's chat template
(`tp_zoo.models.chat_template`) and answered up to an end-of-turn token
(the checkpoint's stop tokens).

Sampling is the compiled sampler's (`lm.compile(sampler=...)`): any keras_hub
sampler that decides token by token (greedy, top-k, top-p, random), with
OpenAI's API's semantics (`sampling`: a temperature of 0 is greedy).

The modules, in the order a call passes them: `inputs` (strings,
conversations or ids, parsed into prompts), `planning` (budgets and shapes),
`programs` (the compiled passes, their tokens picked by `sampling`),
`streaming` (ids and text as they come).
"""

from tp_zoo.models.generation import programs
from tp_zoo.models.generation.planning import plan_request
from tp_zoo.models.generation.sampling import check_sampler
from tp_zoo.models.generation.streaming import TextStream
from tp_zoo.models.generation.streaming import stream_ids

__all__ = ["generate", "stream_ids"]


def generate(lm, inputs, max_length=None, max_new_tokens=None, stop_token_ids="auto", strip_prompt=False,
             chat_template=None, stream=False):
    """Generates from prompts or conversations, sharded, in one compiled
    program (streamed: a program per STREAM_STEPS tokens, `stream_ids`).

    Args:
        inputs: a string or a list of strings (needs the checkpoint's
            tokenizer); a conversation, a list of {"role", "content"} dicts
            (roles "system", "user", "assistant", "tool"), or a list of
            conversations; or a {"token_ids", "padding_mask"} batch of
            right-padded ids.
        max_length: total length (prompt + generated) of every row; each row
            generates up to max_length - its prompt length. Defaults to the
            width of an id batch.
        max_new_tokens: instead of max_length, the tokens each row may add
            (default for strings: 64; for conversations: up to 512, as many
            as the model's positions leave).
        stop_token_ids: "auto" (the checkpoint's end tokens: config.json's,
            generation_config.json's and the tokenizer's EOS), None, or ids.
        strip_prompt: return only the generated part (of strings or ids).
        chat_template: for conversations, a Jinja chat template to use in
            place of the checkpoint's (`tp_zoo.models.chat_template`).
        stream: return an iterator of text pieces as they are decoded (one
            string or conversation only, a `TextStream`); see `stream_ids`.

    A conversation is rendered with the chat template and its generation
    prompt, and its reply is returned: the text the model generates up to
    its end-of-turn token (a stop token), without it.

    Returns strings for string inputs, replies for conversations, else
    {"token_ids", "padding_mask"}. With `stream=True`, a `TextStream` of
    strings whose concatenation is that result less the prompt: for a string
    prompt, the text that follows the prompt's own decoded text (so a space
    the tokenizer folds into the first new token shows); for a conversation,
    the reply. Its `new_ids` are the ids made so far.
    """
    check_sampler(lm.sampler)
    request = plan_request(lm, inputs, max_length, max_new_tokens, stop_token_ids, chat_template)
    if stream:
        if not request.prompts.single:
            raise ValueError("stream=True takes one prompt: a string or one conversation (stream_ids streams ids).")
        return TextStream(lm, request)
    generated = programs.generated_ids(lm, request)
    new_rows = [request.new_ids(r, generated[r]) for r in range(request.batch)]
    return request.prompts.result(lm, request, new_rows, strip_prompt)
