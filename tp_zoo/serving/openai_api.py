"""OpenAI's API on the wire: the request bodies (pydantic models, strict),
the answers (whole, or the chunks of a stream as server-sent events), and
the error object every failure is answered with (400 naming the field, 401,
429 with Retry-After, 500)."""

import json
import math
import secrets
import time
import uuid
from typing import Any
from typing import ClassVar

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from tp_zoo.errors import QueueFullError
from tp_zoo.errors import RequestError

# OpenAI's default max_tokens for a completion.
DEFAULT_COMPLETION_TOKENS = 16
# OpenAI's limit on stop strings.
MAX_STOP_STRINGS = 4


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = False


class GenerationRequest(BaseModel):
    """The fields both endpoints take, as OpenAI's API (and vLLM's extensions
    top_k and stop_token_ids) define them. Types are strict: a number in a
    string is refused, not read. Each field's description is what its value
    must be, as the error for a wrong one says."""

    model_config = ConfigDict(extra="forbid", strict=True)
    # Fields of OpenAI's API this server does not implement, taken only at the
    # value that asks for nothing (clients send some of them as a matter of course).
    NEUTRAL: ClassVar[dict] = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}

    model: str = Field(description="the name of the served model (GET /v1/models), a string")
    max_tokens: int | None = Field(None, description="a whole number")
    temperature: float | None = Field(None, description="a number")
    top_p: float | None = Field(None, description="a number")
    top_k: int | None = Field(None, description="a whole number")
    seed: int | None = Field(None, description="a whole number")
    stop: str | list[str] | None = Field(None, description=f"a string or a list of up to {MAX_STOP_STRINGS} strings")
    stop_token_ids: list[int] | None = Field(None, description="a list of token ids")
    stream: bool | None = Field(False, description="true or false")
    stream_options: StreamOptions | None = Field(None, description='an object {"include_usage": true or false}')
    user: str | None = Field(None, description="a string")
    n: int | None = Field(None, description="a whole number")
    presence_penalty: float | None = Field(None, description="a number")
    frequency_penalty: float | None = Field(None, description="a number")
    logit_bias: dict[str, float] | None = Field(None, description="an object of token ids to numbers")


class CompletionRequest(GenerationRequest):
    """POST /v1/completions."""

    NEUTRAL: ClassVar[dict] = {**GenerationRequest.NEUTRAL, "best_of": 1, "echo": False, "logprobs": None,
                               "suffix": None}

    prompt: str | list[int] = Field(description="a string or a list of token ids")
    best_of: int | None = Field(None, description="a whole number")
    echo: bool | None = Field(None, description="true or false")
    logprobs: int | None = Field(None, description="a whole number")
    suffix: str | None = Field(None, description="a string")


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions."""

    NEUTRAL: ClassVar[dict] = {**GenerationRequest.NEUTRAL, "logprobs": False, "top_logprobs": None}

    messages: list[dict[str, Any]] = Field(description='a list of {"role", "content"} objects')
    max_completion_tokens: int | None = Field(None, description="a whole number")
    logprobs: bool | None = Field(None, description="true or false")
    top_logprobs: int | None = Field(None, description="a whole number")


class EngineFailed(Exception):
    """The engine failed a request (its Output's error)."""


class Answer:
    """An answer's body, whole or as the chunks of a stream, and what they
    share: the id, time and model. A subclass says what a choice holds
    (`choice(text)`) and the chunks it streams (`chunks(generation,
    with_usage)`, up to the one with the finish reason), and its ID_PREFIX,
    OBJECT and CHUNK_OBJECT."""

    def __init__(self, model_name):
        self._fields = {"id": f"{self.ID_PREFIX}-{uuid.uuid4().hex}", "created": int(time.time()),
                        "model": model_name}

    def whole(self, text, finish_reason, usage):
        choice = {"index": 0, **self.choice(text), "logprobs": None, "finish_reason": finish_reason}
        return {**self._fields, "object": self.OBJECT, "choices": [choice], "usage": usage}

    def chunk(self, choices, with_usage, usage=None):
        # With include_usage, OpenAI's chunks carry "usage": null until the last one, which has only the usage.
        chunk = {**self._fields, "object": self.CHUNK_OBJECT, "choices": [{"index": 0, **c} for c in choices]}
        return {**chunk, "usage": usage} if with_usage else chunk


class CompletionAnswer(Answer):
    ID_PREFIX, OBJECT, CHUNK_OBJECT = "cmpl", "text_completion", "text_completion"

    def choice(self, text):
        return {"text": text}

    async def chunks(self, generation, with_usage):
        def chunk(text, finish_reason=None):
            return self.chunk([{"text": text, "logprobs": None, "finish_reason": finish_reason}], with_usage)

        async for piece, finish_reason in generation.pieces():
            if piece:
                yield chunk(piece)
            if finish_reason is not None:
                yield chunk("", finish_reason)


class ChatAnswer(Answer):
    ID_PREFIX, OBJECT, CHUNK_OBJECT = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def choice(self, text):
        return {"message": {"role": "assistant", "content": text}}

    async def chunks(self, generation, with_usage):
        def chunk(delta, finish_reason=None):
            return self.chunk([{"delta": delta, "logprobs": None, "finish_reason": finish_reason}], with_usage)

        yield chunk({"role": "assistant", "content": ""})
        async for piece, finish_reason in generation.pieces():
            if piece:
                yield chunk({"content": piece})
            if finish_reason is not None:
                yield chunk({}, finish_reason)


def event_stream(answer, generation, with_usage):
    """The answer's chunks as server-sent events, as OpenAI sends them:
    then the usage if asked for, or an error event if the engine failed the
    request, and `data: [DONE]`."""

    async def events():
        try:
            async for chunk in answer.chunks(generation, with_usage):
                yield _event(chunk)
            if with_usage and generation.finish_reason is not None:
                yield _event(answer.chunk([], with_usage, generation.usage()))
        except EngineFailed as error:
            yield _event(error_body(f"The request failed in the engine: {error}", kind="server_error"))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(data):
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def check_options(body):
    """Refuses what the server does not implement, naming the field."""
    for name, neutral in body.NEUTRAL.items():
        value = getattr(body, name)
        if value is not None and value != neutral:
            allowed = "leave it out" if neutral is None else f"leave it out or give {json.dumps(neutral)}"
            raise RequestError(f"{name}={json.dumps(value)} is not supported by this server ({allowed}).", param=name)
    if body.stream_options is not None and not body.stream:
        raise RequestError('stream_options applies to streamed requests only ("stream": true).',
                           param="stream_options")


def stop_strings(stop):
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    if len(stops) > MAX_STOP_STRINGS or "" in stops:
        raise RequestError(f"stop={json.dumps(stop)}: must be a string or a list of up to {MAX_STOP_STRINGS} "
                           "strings, none of them empty.", param="stop")
    return stops


def error_body(message, param=None, kind="invalid_request_error", code=None):
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status, message, param=None, kind="invalid_request_error", code=None, headers=None):
    return JSONResponse(error_body(message, param, kind, code), status, headers=headers)


def add_error_handlers(app):
    """Every error as OpenAI's error object: 400 for bad input (naming the
    field in `param`), 429 with Retry-After for a full queue, 500 for a
    request the engine failed."""

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, error):
        body = ChatCompletionRequest if request.url.path.endswith("/chat/completions") else CompletionRequest
        message, param = _validation_message(error.errors(), body)
        return error_response(400, message, param)

    @app.exception_handler(RequestError)
    async def bad_request(request, error):
        return error_response(400, str(error), error.param)

    @app.exception_handler(QueueFullError)
    async def queue_full(request, error):
        return error_response(429, str(error), kind="rate_limit_error", code="rate_limit_exceeded",
                      headers={"Retry-After": str(math.ceil(error.retry_after))})

    @app.exception_handler(EngineFailed)
    async def engine_failed(request, error):
        return error_response(500, f"The request failed in the engine: {error}", kind="server_error")

    @app.exception_handler(HTTPException)
    async def http_error(request, error):  # an unknown path, a wrong method
        return error_response(error.status_code, f"{error.detail}: {request.method} {request.url.path}",
                              headers=error.headers)

    @app.exception_handler(Exception)
    async def server_error(request, error):  # a bug: uvicorn logs its traceback
        return error_response(500, f"The server failed on this request ({type(error).__name__}); its log says more.",
                      kind="server_error")


def _validation_message(errors, body):
    """(message, param) of the first problem pydantic found in a body of
    the model `body`."""
    error = errors[0]
    where = error["loc"][1:]  # after "body"
    if error["type"] == "json_invalid":
        return f"The request body is not valid JSON: {error['ctx']['error']}.", None
    if not where or not isinstance(where[0], str):
        return "The request body must be a JSON object, sent with Content-Type: application/json.", None
    param = where[0]
    rule = body.model_fields[param].description if param in body.model_fields else None
    if error["type"] == "extra_forbidden":
        path = ".".join(map(str, where))
        return f"{path!r} is not a field this server takes.", path
    if error["type"] == "missing":
        return f"The request has no {param!r}: it must be {rule}.", param
    got = f"; got {_shown(error['input'])}" if len(where) == 1 else ""  # deeper, the input is a part of the value
    return f"{param!r} must be {rule}{got}.", param


def _shown(value, limit=60):
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RequireApiKey:
    """Refuses /v1/ requests without the header `Authorization: Bearer
    <key>`, as OpenAI does, before anything reads their body."""

    def __init__(self, app, api_key):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = Headers(scope=scope).get("authorization", "").encode("latin-1")  # the header's own bytes
            if not secrets.compare_digest(given, self._expected):
                response = error_response(401, "Missing or wrong API key: send it as the header 'Authorization: Bearer "
                                       "<key>'.", code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
