"""An OpenAI-compatible HTTP server over continuous-batching engines.

`create_app(engines, model_name, api_key)` is the FastAPI app around any
objects with the interface of `tp_zoo.serving.engine.Engine`: POST
/v1/completions and /v1/chat/completions (a whole answer, or server-sent
events with `"stream": true`), GET /v1/models, /health and /metrics.
`serve(...)` loads the model once per data-parallel copy, starts an engine
on each and runs the app with uvicorn.

Each request goes to the engine with the fewest running and waiting
requests. Its outputs come from the engine's thread into the event loop
(`call_soon_threadsafe`), where its text is made (`tp_zoo.serving.text`).
A request its client leaves (a dropped connection, a closed stream) is
cancelled in its engine at once, which frees its slot and KV pages; so is
one that reached a stop string.
"""

import asyncio
import socket
import sys
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from tp_zoo.errors import RequestError
from tp_zoo.models.chat_template import ChatTemplate
from tp_zoo.models.chat_template import check_conversation
from tp_zoo.models.generation.inputs import DEFAULT_REPLY_TOKENS
from tp_zoo.models.generation.planning import checkpoint_stop_ids
from tp_zoo.serving import openai_api
from tp_zoo.serving.metrics import ServerMetrics
from tp_zoo.serving.requests import CANCELLED
from tp_zoo.serving.requests import ERROR
from tp_zoo.serving.requests import STOP
from tp_zoo.serving.requests import SamplingParams
from tp_zoo.serving.text import RequestText

# Seconds that open requests get to end when the server is stopped.
GRACEFUL_SHUTDOWN_SECONDS = 5


_CLIENT_GONE = object()  # put among a request's outputs when its client disconnects


def create_app(engines, model_name, api_key=None):
    """The FastAPI app serving `engines` (started, each with `Engine`'s
    interface, all of the same model) as the model `model_name`; with
    `api_key`, /v1/ requests need the header `Authorization: Bearer <key>`."""
    engines = list(engines)
    if not engines:
        raise ValueError("create_app needs at least one engine.")
    backend = _Backend(engines)
    app = FastAPI(title="tp_zoo", summary=f"OpenAI-compatible API serving {model_name}")
    if api_key is not None:
        app.add_middleware(openai_api.RequireApiKey, api_key=api_key)
    openai_api.add_error_handlers(app)

    def check_model(name):
        if name != model_name:
            raise RequestError(f"The model {name!r} is not served here; this server serves {model_name!r}.",
                               param="model")

    @app.post("/v1/completions")
    async def completions(body: openai_api.CompletionRequest, request: Request):
        check_model(body.model)
        openai_api.check_options(body)
        prompt_ids = backend.tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        room = backend.room(prompt_ids, "prompt")
        max_tokens = min(openai_api.DEFAULT_COMPLETION_TOKENS, room) if body.max_tokens is None else body.max_tokens
        # The completion's text follows the prompt's, so that a space its first token starts with shows.
        generation = backend.start(prompt_ids, body, max_tokens, request, context=prompt_ids)
        return await _respond(openai_api.CompletionAnswer(model_name), generation, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: openai_api.ChatCompletionRequest, request: Request):
        check_model(body.model)
        openai_api.check_options(body)
        prompt_ids = _chat_prompt(backend.tokenizer, body.messages)
        room = backend.room(prompt_ids, "messages")
        budget_field = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
        max_tokens = getattr(body, budget_field)
        if max_tokens is None:  # generate()'s reply budget
            max_tokens = min(DEFAULT_REPLY_TOKENS, room)
        try:
            generation = backend.start(prompt_ids, body, max_tokens, request, context=())
        except RequestError as error:  # the engine's names for what this request calls messages and its budget
            param = {"prompt": "messages", "max_tokens": budget_field}.get(error.param, error.param)
            raise RequestError(str(error), param=param) from None
        return await _respond(openai_api.ChatAnswer(model_name), generation, body)

    _add_status_routes(app, engines, backend, model_name)
    return app


def _add_status_routes(app, engines, backend, model_name):
    """GET /v1/models, /health and /metrics."""
    created = int(time.time())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "tp_zoo", "max_model_len": backend.positions}]}

    @app.get("/health")
    async def health():
        stopped = [index for index, engine in enumerate(engines) if not engine.running]
        if stopped:
            return openai_api.error_response(503, f"The loop of engine(s) {stopped} is not running.",
                                             kind="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(backend.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def _chat_prompt(tokenizer, messages):
    """A conversation's prompt ids, as generate(messages) renders it."""
    try:
        return ChatTemplate(tokenizer).encode(check_conversation(messages), add_generation_prompt=True)
    except ValueError as error:  # a bad message, or the template's own error (ChatTemplateError)
        raise RequestError(str(error), param="messages") from None


class _Backend:
    """The engines behind the app, and what requests need of their model:
    the tokenizer, the checkpoint's stop ids, the positions."""

    def __init__(self, engines):
        self.engines = engines
        lm = engines[0].lm
        if lm.tokenizer is None:
            raise ValueError("This checkpoint has no tokenizer files: the server needs them to read prompts and "
                             "write text.")
        self.tokenizer = lm.tokenizer
        self.stop_token_ids = tuple(checkpoint_stop_ids(lm) or ())
        self.positions = engines[0].max_positions
        self.metrics = ServerMetrics(engines)

    def room(self, prompt_ids, param):
        """The tokens the positions leave after a prompt; a prompt that leaves
        none is refused, naming `param` (the engine would name max_tokens)."""
        if len(prompt_ids) >= self.positions:
            what = "The conversation, as the chat template renders it," if param == "messages" else "The prompt"
            raise RequestError(f"{what} is {len(prompt_ids)} tokens, which leaves no room for new tokens within the "
                               f"model's {self.positions} positions.", param=param)
        return self.positions - len(prompt_ids)

    def start(self, prompt_ids, body, max_tokens, request, context):
        """Submits the request to the least busy engine: its `_Generation`."""
        stop = openai_api.stop_strings(body.stop)
        sampling = {name: getattr(body, name) for name in ("temperature", "top_p", "top_k", "seed")}
        params = SamplingParams(
            max_tokens=max_tokens,
            stop_token_ids=tuple(dict.fromkeys([*self.stop_token_ids, *(body.stop_token_ids or ())])),
            **{name: value for name, value in sampling.items() if value is not None},
        )
        engine = min(self.engines, key=_requests_in)
        text = RequestText(self.tokenizer.decode, stop, context)
        return _Generation(engine, prompt_ids, params, text, request, self.metrics)


def _requests_in(engine):
    stats = engine.stats()
    return stats.running + stats.waiting


class _Generation:
    """One request in an engine: its outputs, bridged from the engine's
    thread into the event loop, as text pieces. Cancelled in the engine if
    left before its end (a stop string reached, its client gone)."""

    def __init__(self, engine, prompt_ids, params, text, request, metrics):
        loop = asyncio.get_running_loop()
        outputs = asyncio.Queue()

        def on_output(output):  # called on the engine's thread
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, output)
            except RuntimeError:  # the event loop has closed: the server is stopping
                pass

        self._engine, self._text, self._request, self._metrics = engine, text, request, metrics
        self._outputs = outputs
        self.prompt_tokens, self.completion_tokens = len(prompt_ids), 0
        self.finish_reason = None  # "stop" or "length" once the text is whole
        self._submitted = time.perf_counter()
        self._seq_id = engine.submit(list(prompt_ids), params, on_output)
        self._in_engine = True
        # Watched from now, not from the first read of the text: a client gone
        # before a stream starts leaves no request behind either.
        self._watcher = asyncio.ensure_future(self._watch_client())

    async def pieces(self):
        """Yields (text, finish_reason): pieces of text with None, then a
        last one (maybe empty) with "stop" or "length". Ends without that
        last one if the client disconnects; raises `openai_api.EngineFailed` if the
        engine fails the request."""
        try:
            while True:
                output = await self._outputs.get()
                if output is _CLIENT_GONE:
                    return
                if output.new_ids and not self.completion_tokens:
                    self._metrics.time_to_first_token.observe(time.perf_counter() - self._submitted)
                self.completion_tokens += len(output.new_ids)
                if output.finish_reason is not None:
                    self._in_engine = False
                if output.finish_reason in (ERROR, CANCELLED):  # CANCELLED too: not by us, so the engine dropped it
                    self._metrics.requests.labels(ERROR).inc()
                    raise openai_api.EngineFailed(output.error or "The engine dropped the request.")
                shown = output.new_ids[:-1] if output.finish_reason == STOP else output.new_ids  # not the stop token
                piece = self._text.add(shown)
                finish_reason = STOP if self._text.stopped else output.finish_reason
                if finish_reason is not None:
                    self._leave_engine()  # at a stop string, the engine would go on
                    self._metrics.requests.labels(finish_reason).inc()
                    self.finish_reason = finish_reason
                    yield piece + self._text.finish(), finish_reason
                    return
                if piece:
                    yield piece, None
        finally:
            self._watcher.cancel()
            self._cancel()  # if left before its end: a stream closed or cancelled

    async def text(self):
        """The whole text (with `finish_reason` set), or the text so far if
        the client disconnected (`finish_reason` None)."""
        return "".join([piece async for piece, _ in self.pieces()])

    def usage(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _leave_engine(self):
        """Cancels the request in its engine if it runs there still; whether it did."""
        if not self._in_engine:
            return False
        self._engine.cancel(self._seq_id)
        self._in_engine = False
        return True

    def _cancel(self):
        if self._leave_engine():
            self._metrics.requests.labels(CANCELLED).inc()

    async def _watch_client(self):
        # The body is read by now: the next message is the disconnect (or, once
        # the response is sent, its end, which finds the request ended).
        while (await self._request.receive())["type"] != "http.disconnect":
            pass
        self._cancel()
        self._outputs.put_nowait(_CLIENT_GONE)


async def _respond(answer, generation, body):
    """The generation's response: server-sent events if asked to stream,
    else the whole answer."""
    if body.stream:
        with_usage = body.stream_options is not None and bool(body.stream_options.include_usage)
        return openai_api.event_stream(answer, generation, with_usage)
    text = await generation.text()
    if generation.finish_reason is None:  # the client disconnected
        return Response(status_code=499)  # read by no one: for the access log (nginx's "client closed request")
    return answer.whole(text, generation.finish_reason, generation.usage())


def default_model_name(preset):
    """The name a model is served as by default: a preset's name, a
    directory's own name, a Hub repo's org/name."""
    if str(preset).startswith("hf://"):
        return str(preset)[len("hf://"):]
    path = Path(str(preset)).expanduser()
    return path.resolve().name if path.is_dir() else str(preset)


def serve(preset, tp=1, dp=1, host="127.0.0.1", port=8000, api_key=None, served_model_name=None, max_batch=64,
          kv_memory=None, prefill_chunk=512, max_waiting=1024, dtype=None, quantize=None):
    """Serves `preset` at http://host:port until interrupted: loaded `dp`
    times, each copy on its own `tp` devices with its own engine (`Engine`'s
    max_batch, kv_memory in bytes, prefill_chunk, max_waiting); the other
    arguments as for `create_app` and `tp_zoo.from_preset`."""
    import jax
    import uvicorn

    import tp_zoo
    from tp_zoo.serving.engine import Engine

    devices = jax.devices()
    if tp * dp > len(devices):
        raise ValueError(f"tp={tp} x dp={dp} needs {tp * dp} devices; {len(devices)} are available.")
    listener = _listen(host, port)  # before loading, which takes minutes, so that a taken port fails at once
    started = []
    try:
        models = []
        for copy in range(dp):
            start = time.perf_counter()
            copy_devices = None if dp == 1 else devices[copy * tp:(copy + 1) * tp]
            models.append(tp_zoo.from_preset(preset, tp=tp, devices=copy_devices, dtype=dtype, quantize=quantize,
                                             progress=sys.stdout.isatty()))
            which = f" (copy {copy + 1} of {dp})" if dp > 1 else ""
            print(f"loaded in {time.perf_counter() - start:.1f} s on {tp} device(s){which}", file=sys.stderr)
        engines = [Engine(lm, max_batch=max_batch, kv_memory=kv_memory, prefill_chunk=prefill_chunk,
                          max_waiting=max_waiting) for lm in models]
        name = served_model_name or default_model_name(preset)
        app = create_app(engines, name, api_key)
        for engine in engines:
            engine.start()
            started.append(engine)
        server = uvicorn.Server(uvicorn.Config(app, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS))
        # The socket listens already: a client connecting now is answered as soon as uvicorn runs.
        print(f"serving {name} at {_url(host, listener.getsockname()[1])}/v1", flush=True)
        try:
            server.run(sockets=[listener])
        except KeyboardInterrupt:  # Ctrl-C, raised again once uvicorn has shut down: the way to stop
            pass
    finally:
        for engine in started:
            engine.stop()
        listener.close()


def _listen(host, port):
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as error:
        raise ValueError(f"Cannot listen on {host}:{port}: {error.strerror or error}.") from None


def _url(host, port):
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
