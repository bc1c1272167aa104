"""The OpenAI-compatible server over a fake engine: a real uvicorn server in
a thread of this process, called with the `openai` client (and with httpx2,
which it is built on, where the client cannot: bad JSON, the raw events).

The fake engine has the interface of `tp_zoo.serving.engine.Engine` over a
fixed rule, in a thread, so that the HTTP layer is tested without a model:
every request's new ids are REPLY's, then the checkpoint's stop token, two
per step."""

import concurrent.futures
import itertools
import json
import socket
import threading
import time
from types import SimpleNamespace

import httpx2
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from tests.models import chat_templates
from tp_zoo import cli
from tp_zoo.errors import QueueFullError
from tp_zoo.errors import RequestError
from tp_zoo.models.chat_template import ChatTemplate
from tp_zoo.models.tokenizer import CheckpointTokenizer
from tp_zoo.serving.requests import CANCELLED
from tp_zoo.serving.requests import ERROR
from tp_zoo.serving.requests import LENGTH
from tp_zoo.serving.requests import STOP
from tp_zoo.serving.requests import Output
from tp_zoo.serving.server import create_app
from tp_zoo.serving.text import REDECODE_IDS
from tp_zoo.serving.text import RequestText

MODEL = "tiny-chat"
KEY = "sk-test-key"
POSITIONS = 256
# The fake engine's reply: byte-level tokens, multi-byte characters split over several.
REPLY = " Four score and seven years ago our fathers brought forth, café ✓"
IDS_PER_STEP = 2
PAGES = 100
WAIT = 5  # seconds that anything the tests wait for may take


class FakeEngine:
    """`Engine`'s interface: each request gets `script`'s ids in turn,
    IDS_PER_STEP per step, until a stop id of its params or max_tokens.
    `failing`: prompts (tuples of ids) whose request fails after its first
    step; `queue_full`: submit refuses; `cancelled`: seq_id -> when."""

    def __init__(self, lm, script, seq_ids):
        self.lm = lm
        self._seq_ids = seq_ids  # shared by the engines, so that the newest request is the highest id
        self.max_positions = lm.backbone.max_sequence_length
        self.script = script
        self.step_seconds = 0.002
        self.failing = set()
        self.queue_full = False
        self.submitted = []  # (seq_id, prompt_ids, params)
        self.cancelled = {}
        self.generated_tokens = 0
        self._requests = {}  # seq_id -> its state
        self._lock = threading.Lock()
        self._thread = None

    def start(self):
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self):
        self._stopping.set()
        self._thread.join(WAIT)

    @property
    def running(self):
        return self._thread is not None and self._thread.is_alive()

    def submit(self, prompt_ids, params, on_output):
        if self.queue_full:
            raise QueueFullError("1024 requests wait already; retry later.", retry_after=3)
        if not prompt_ids or not all(0 <= i < self.lm.backbone.vocab_size for i in prompt_ids):
            raise RequestError("The prompt is empty or has ids outside the vocab.", param="prompt")
        if len(prompt_ids) + params.max_tokens > self.max_positions:
            raise RequestError(f"A prompt of {len(prompt_ids)} tokens + max_tokens={params.max_tokens} is beyond the "
                               f"model's {self.max_positions} positions.",
                               param="prompt" if len(prompt_ids) >= self.max_positions else "max_tokens")
        with self._lock:
            seq_id = next(self._seq_ids)
            self.submitted.append((seq_id, list(prompt_ids), params))
            self._requests[seq_id] = SimpleNamespace(prompt=tuple(prompt_ids), params=params, on_output=on_output,
                                                     made=0, cancelled=False)
        return seq_id

    def cancel(self, seq_id):
        with self._lock:
            self.cancelled[seq_id] = time.monotonic()
            if seq_id in self._requests:
                self._requests[seq_id].cancelled = True

    def stats(self):
        with self._lock:
            running = len(self._requests)
            return SimpleNamespace(running=running, waiting=0, pages_used=2 * running, pages_total=PAGES,
                                   generated_tokens=self.generated_tokens, preemptions=0,
                                   prefix_cached_tokens=3 * self.generated_tokens)

    def _loop(self):
        while not self._stopping.wait(self.step_seconds):
            with self._lock:
                for seq_id, request in list(self._requests.items()):
                    output = self._step(request)
                    if output.finish_reason is not None:
                        del self._requests[seq_id]
                    request.on_output(output)

    def _step(self, request):
        if request.cancelled:
            return Output((), CANCELLED)
        if request.made and request.prompt in self.failing:
            return Output((), ERROR, error="the device ran out of memory (a fake failure)")
        ids = []
        for _ in range(IDS_PER_STEP):
            token = self.script[request.made % len(self.script)]
            ids.append(token)
            request.made += 1
            self.generated_tokens += 1
            if token in request.params.stop_token_ids:
                return Output(tuple(ids), STOP)
            if request.made == request.params.max_tokens:
                return Output(tuple(ids), LENGTH)
        return Output(tuple(ids))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen_tokenizer")
    return CheckpointTokenizer.from_directory(directory, chat_templates.write_tokenizer(directory, "qwen2.5"),
                                              adds_bos=False)


@pytest.fixture(scope="module")
def served(tokenizer):
    """(url, the two engines, REPLY's ids) of a server of two fake engines
    (two data-parallel copies) needing the key KEY."""
    lm = SimpleNamespace(tokenizer=tokenizer, hf_config={},
                         backbone=SimpleNamespace(max_sequence_length=POSITIONS, vocab_size=tokenizer.vocab_size))
    reply_ids = tokenizer.encode(REPLY)
    seq_ids = itertools.count()
    engines = [FakeEngine(lm, [*reply_ids, tokenizer.eos_ids[0]], seq_ids) for _ in range(2)]  # then <|im_end|>
    for engine in engines:
        engine.start()
    listener = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engines, MODEL, api_key=KEY), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    yield SimpleNamespace(url=f"http://127.0.0.1:{listener.getsockname()[1]}", engines=engines, reply_ids=reply_ids)
    server.should_exit = True
    thread.join(WAIT)
    for engine in engines:
        engine.stop()
    listener.close()


@pytest.fixture
def client(served):
    with openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0, timeout=WAIT) as client:
        yield client


@pytest.fixture
def http(served):
    with httpx2.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=WAIT) as http:
        yield http


def _newest(served):
    """(engine, seq_id, prompt_ids, params) of the request submitted last."""
    return max(((engine, *request) for engine in served.engines for request in engine.submitted), key=lambda r: r[1])


def _total_submitted(served):
    return sum(len(engine.submitted) for engine in served.engines)


def _events(http, path, body):
    """The data of each server-sent event of a streamed request, checked to
    be `data: ` lines ending with `data: [DONE]`."""
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def _until(condition, what):
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"not within {WAIT} s: {what}"
        time.sleep(0.01)


def _continuation(tokenizer, prompt_ids, new_ids):
    return tokenizer.decode([*prompt_ids, *new_ids])[len(tokenizer.decode(prompt_ids)):]


# --- answers --------------------------------------------------------------------------


def test_completion_whole_and_streamed(served, client, http, tokenizer):
    """A completion's text follows the prompt's (a string or ids); streamed,
    its pieces join to the same text, the last chunk has the finish reason
    (and, asked for, a chunk of usage follows), then [DONE]."""
    prompt_ids = tokenizer.encode("Four score")
    expected = _continuation(tokenizer, prompt_ids, served.reply_ids[:8])
    whole = client.completions.create(model=MODEL, prompt="Four score", max_tokens=8)
    _, _, submitted, params = _newest(served)
    assert submitted == prompt_ids and params.max_tokens == 8
    assert (whole.object, whole.model, whole.id[:5]) == ("text_completion", MODEL, "cmpl-")
    assert [(c.index, c.text, c.finish_reason) for c in whole.choices] == [(0, expected, "length")]
    usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": 8, "total_tokens": len(prompt_ids) + 8}
    assert whole.usage.model_dump(exclude_none=True) == usage

    chunks = list(client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=8, stream=True))
    assert len(chunks) > 3 and "".join(c.choices[0].text for c in chunks) == expected
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]

    *pieces, last = _events(http, "/v1/completions", {"model": MODEL, "prompt": "Four score", "max_tokens": 8,
                                                      "stream_options": {"include_usage": True}})
    assert "".join(p["choices"][0]["text"] for p in pieces) == expected
    assert pieces[-1]["choices"] == [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]
    assert all(p["object"] == "text_completion" and p["id"] == last["id"] and p["usage"] is None for p in pieces)
    assert last["choices"] == [] and last["usage"] == usage

    default = client.completions.create(model=MODEL, prompt="Four score")  # OpenAI's 16 tokens
    assert default.usage.completion_tokens == 16 and _newest(served)[3].max_tokens == 16


def test_chat_whole_and_streamed(served, client, http, tokenizer):
    """A reply to messages rendered as generate() renders them, without its
    stop token; streamed, a role delta first, content deltas, a last chunk
    with the finish reason, then [DONE]."""
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Go on — café?"}]
    assert tokenizer.decode(served.reply_ids) == REPLY
    whole = client.chat.completions.create(model=MODEL, messages=messages)
    _, _, prompt_ids, params = _newest(served)
    assert prompt_ids == ChatTemplate(tokenizer).encode(messages, add_generation_prompt=True)
    assert params.max_tokens == min(512, POSITIONS - len(prompt_ids))  # generate()'s reply budget
    assert params.stop_token_ids == tuple(tokenizer.eos_ids)
    assert (whole.object, whole.id[:9]) == ("chat.completion", "chatcmpl-")
    [choice] = whole.choices
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", REPLY, "stop")
    assert whole.usage.completion_tokens == len(served.reply_ids) + 1  # the stop token counted, not shown

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == REPLY
    assert chunks[-1].choices[0].finish_reason == "stop" and not any(c.choices[0].finish_reason for c in chunks[:-1])

    events = _events(http, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_completion_tokens": 5})
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    assert events[-1]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == tokenizer.decode(
        served.reply_ids[:5])
    assert _newest(served)[3].max_tokens == 5


def test_sampling_fields_reach_the_engine(served, client, tokenizer):
    client.completions.create(model=MODEL, prompt="Four score", max_tokens=3, temperature=0.5, top_p=0.9, seed=7,
                              extra_body={"top_k": 5, "stop_token_ids": [7, tokenizer.eos_ids[0]]})
    params = _newest(served)[3]
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.5, 0.9, 5, 7)
    assert params.stop_token_ids == (*tokenizer.eos_ids, 7)  # the checkpoint's and the request's, once each
    client.completions.create(model=MODEL, prompt="Four score", max_tokens=3)
    params = _newest(served)[3]
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (1.0, 1.0, 0, None)  # OpenAI's defaults


@pytest.mark.parametrize("stop, expected", [
    ("seven", " Four score and "),  # "seven" comes over three steps' ids
    (["card", "ago", "years"], " Four score and seven "),  # the first one the text reaches
    ("score card", REPLY),  # begins ("score"), then does not match: all of it shows
])
def test_stop_strings(served, client, stop, expected):
    """The text ends before the first stop string (finish "stop"), streamed
    or not, and the engine's request is cancelled at once; text that could
    begin one is held back until it does not."""
    messages = [{"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, stop=stop)
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (expected, "stop")
    engine, seq_id, _, _ = _newest(served)
    if expected != REPLY:
        _until(lambda: seq_id in engine.cancelled, "the request cancelled at its stop string")
        assert whole.usage.completion_tokens < len(served.reply_ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


# --- bad input ------------------------------------------------------------------------

COMPLETION = {"model": MODEL, "prompt": "Four score"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
BAD_INPUT = {  # name: (path, body, param, words of the message)
    "invalid JSON": ("completions", b'{"model": "tiny-chat", "prompt": ', None, "not valid JSON"),
    "not an object": ("completions", [1, 2], None, "JSON object"),
    "unknown model": ("completions", {**COMPLETION, "model": "gpt-4"}, "model", "'gpt-4' is not served"),
    "no model": ("completions", {"prompt": "x"}, "model", "no 'model'"),
    "no prompt": ("completions", {"model": MODEL}, "prompt", "no 'prompt'"),
    "no messages": ("chat/completions", {"model": MODEL}, "messages", "no 'messages'"),
    "max_tokens a string": ("completions", {**COMPLETION, "max_tokens": "10"}, "max_tokens", "whole number"),
    "max_tokens a fraction": ("completions", {**COMPLETION, "max_tokens": 2.5}, "max_tokens", "got 2.5"),
    "temperature a string": ("completions", {**COMPLETION, "temperature": "hot"}, "temperature", "a number"),
    "prompt of strings": ("completions", {**COMPLETION, "prompt": ["a", "b"]}, "prompt", "list of token ids"),
    "stream not a bool": ("completions", {**COMPLETION, "stream": "yes"}, "stream", "true or false"),
    "stream_options wrong": ("completions", {**COMPLETION, "stream": True, "stream_options": {"include_usage": 1}},
                             "stream_options", "include_usage"),
    "unknown field": ("completions", {**COMPLETION, "frobnicate": 1}, "frobnicate", "not a field"),
    "unknown inner field": ("completions", {**COMPLETION, "stream": True, "stream_options": {"usage": True}},
                            "stream_options.usage", "not a field"),
    "logprobs not a number": ("completions", {**COMPLETION, "logprobs": "yes"}, "logprobs", "a whole number"),
    "negative max_tokens": ("completions", {**COMPLETION, "max_tokens": -1}, "max_tokens", "max_tokens=-1"),
    "zero max_tokens": ("completions", {**COMPLETION, "max_tokens": 0}, "max_tokens", "max_tokens=0"),
    "too large max_tokens": ("completions", {**COMPLETION, "max_tokens": 10_000}, "max_tokens", "positions"),
    "prompt beyond the positions": ("completions", {**COMPLETION, "prompt": [5] * POSITIONS, "max_tokens": 1},
                                    "prompt", "no room"),
    "prompt and max_tokens beyond": ("completions", {**COMPLETION, "prompt": [5] * 250, "max_tokens": 10},
                                     "max_tokens", "positions"),
    "ids outside the vocab": ("completions", {**COMPLETION, "prompt": [5, 99_999]}, "prompt", "vocab"),
    "empty prompt": ("completions", {**COMPLETION, "prompt": ""}, "prompt", "empty"),
    "negative temperature": ("completions", {**COMPLETION, "temperature": -1}, "temperature", "temperature=-1"),
    "top_p 0": ("completions", {**COMPLETION, "top_p": 0}, "top_p", "(0, 1]"),
    "negative top_k": ("completions", {**COMPLETION, "top_k": -1}, "top_k", "top_k=-1"),
    "negative seed": ("completions", {**COMPLETION, "seed": -3}, "seed", "seed=-3"),
    "bad stop token id": ("completions", {**COMPLETION, "stop_token_ids": [-1]}, "stop_token_ids", "token ids"),
    "five stop strings": ("completions", {**COMPLETION, "stop": list("abcde")}, "stop", "up to 4"),
    "empty stop string": ("completions", {**COMPLETION, "stop": ""}, "stop", "none of them empty"),
    "n 2": ("completions", {**COMPLETION, "n": 2}, "n", "n=2 is not supported"),
    "logprobs": ("completions", {**COMPLETION, "logprobs": 1}, "logprobs", "logprobs=1 is not supported"),
    "echo": ("completions", {**COMPLETION, "echo": True}, "echo", "echo=true is not supported"),
    "best_of 2": ("completions", {**COMPLETION, "best_of": 2}, "best_of", "best_of=2 is not supported"),
    "suffix": ("completions", {**COMPLETION, "suffix": "!"}, "suffix", 'suffix="!" is not supported'),
    "presence_penalty": ("chat/completions", {**CHAT, "presence_penalty": 0.5}, "presence_penalty",
                         "presence_penalty=0.5"),
    "chat logprobs": ("chat/completions", {**CHAT, "logprobs": True}, "logprobs", "logprobs=true"),
    "usage without stream": ("completions", {**COMPLETION, "stream_options": {"include_usage": True}},
                             "stream_options", "streamed requests only"),
    "messages a string": ("chat/completions", {**CHAT, "messages": "Hi"}, "messages", "list of"),
    "message without role": ("chat/completions", {**CHAT, "messages": [{"content": "Hi"}]}, "messages",
                             "no 'role' key"),
    "unknown role": ("chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "Hi"}]}, "messages",
                     "unknown role 'wizard'"),
    "content not a string": ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": None}]},
                             "messages", "content of type NoneType"),
    "template error": ("chat/completions",  # the template loops over tool_calls
                       {**CHAT, "messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "", "tool_calls": 5}]},
                       "messages", "chat template failed"),
    "messages beyond the positions": ("chat/completions",
                                      {**CHAT, "messages": [{"role": "user", "content": "Four score " * 200}]},
                                      "messages", "no room"),
    "zero max_completion_tokens": ("chat/completions", {**CHAT, "max_completion_tokens": 0},
                                   "max_completion_tokens", "at least 1"),
    "chat too large max_tokens": ("chat/completions", {**CHAT, "max_tokens": 1000}, "max_tokens", "positions"),
}


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_is_a_400_naming_the_field(served, http, case):
    path, body, param, words = BAD_INPUT[case]
    before = _total_submitted(served)
    if isinstance(body, bytes):
        response = http.post(f"/v1/{path}", content=body, headers={"Content-Type": "application/json"})
    else:
        response = http.post(f"/v1/{path}", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(response.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"], error["message"]
    assert _total_submitted(served) == before  # nothing reached the engines


def test_the_client_sees_the_field(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="gpt-4", prompt="Hi")
    assert caught.value.status_code == 400 and caught.value.param == "model" and "gpt-4" in caught.value.message


def test_a_full_queue_is_a_429_with_retry_after(served, client, http):
    for engine in served.engines:
        engine.queue_full = True
    try:
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=CHAT["messages"])
        response = http.post("/v1/completions", json=COMPLETION)
        assert response.status_code == 429 and response.headers["Retry-After"] == "3"
        assert response.json()["error"]["type"] == "rate_limit_error"
    finally:
        for engine in served.engines:
            engine.queue_full = False
    assert client.completions.create(**COMPLETION, max_tokens=2).choices[0].finish_reason == "length"


def test_the_api_key(served):
    """/v1/ needs `Authorization: Bearer KEY`, checked before the body is
    read; /health and /metrics do not."""
    with openai.OpenAI(base_url=f"{served.url}/v1", api_key="sk-wrong", max_retries=0, timeout=WAIT) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    with httpx2.Client(base_url=served.url, timeout=WAIT) as anonymous:
        response = anonymous.post("/v1/completions", content=b"not even JSON")
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert anonymous.get("/health").status_code == 200 and anonymous.get("/metrics").status_code == 200


# --- failures and departures ----------------------------------------------------------


def test_a_request_failing_in_the_engine_fails_alone(served, client, http, tokenizer):
    failing = tokenizer.encode("Fail, please")
    for engine in served.engines:
        engine.failing.add(tuple(failing))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        good = pool.submit(client.completions.create, model=MODEL, prompt="Four score", max_tokens=40)
        bad = pool.submit(client.completions.create, model=MODEL, prompt=failing, max_tokens=40)
        with pytest.raises(openai.InternalServerError) as caught:
            bad.result()
        assert caught.value.status_code == 500 and "fake failure" in caught.value.message
        assert caught.value.type == "server_error"
        assert good.result().choices[0].finish_reason == "length"
    *pieces, error = _events(http, "/v1/completions", {"model": MODEL, "prompt": failing, "max_tokens": 40})
    assert pieces and error["error"]["type"] == "server_error" and "fake failure" in error["error"]["message"]
    failing_chat = [{"role": "user", "content": "Fail, please"}]
    for engine in served.engines:
        engine.failing.add(tuple(ChatTemplate(tokenizer).encode(failing_chat, add_generation_prompt=True)))
    with pytest.raises(openai.APIError, match="fake failure"):
        list(client.chat.completions.create(model=MODEL, messages=failing_chat, stream=True))
    # The server goes on.
    assert client.completions.create(**COMPLETION, max_tokens=4).usage.completion_tokens == 4


@pytest.fixture
def slow_engines(served):
    """The engines at a step of 50 ms: a request runs over a second (to its stop token)."""
    for engine in served.engines:
        engine.step_seconds = 0.05
    yield served.engines
    for engine in served.engines:
        engine.step_seconds = 0.002
    _until(lambda: not any(engine.stats().running for engine in served.engines), "the engines idle")


def test_a_client_that_leaves_frees_its_slot(served, http, slow_engines):
    """Streamed or not, a request whose client disconnects is cancelled in
    its engine at once, long before it would end."""
    body = {"model": MODEL, "prompt": "Four score", "max_tokens": 200}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert next(response.iter_lines()).startswith("data: ")
        engine, seq_id, _, _ = _newest(served)
    _until(lambda: seq_id in engine.cancelled, "the stream's request cancelled")
    with pytest.raises(httpx2.ReadTimeout):
        http.post("/v1/chat/completions", json=CHAT, timeout=0.3)
    engine, seq_id, _, _ = _newest(served)
    _until(lambda: seq_id in engine.cancelled, "the waiting client's request cancelled")


def test_requests_go_to_the_least_busy_engine(served, client, http, slow_engines):
    with http.stream("POST", "/v1/completions", json={**COMPLETION, "max_tokens": 200, "stream": True}) as response:
        next(response.iter_lines())
        busy = _newest(served)[0]
        client.completions.create(**COMPLETION, max_tokens=2)
        assert _newest(served)[0] is not busy


def test_models_and_health(served, client, http):
    assert [(m.id, m.object) for m in client.models.list().data] == [(MODEL, "model")]
    assert http.get("/v1/models").json()["data"][0]["max_model_len"] == POSITIONS
    assert http.get("/health").json() == {"status": "ok"}
    missing = http.get("/v1/engines")
    assert missing.status_code == 404 and "GET /v1/engines" in missing.json()["error"]["message"]
    served.engines[1].stop()
    try:
        response = http.get("/health")
        assert response.status_code == 503 and "[1]" in response.json()["error"]["message"]
    finally:
        served.engines[1].start()
    assert http.get("/health").status_code == 200


def _metrics(http):
    """{(sample name, labels): value} of /metrics."""
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def test_metrics(served, client, http):
    _until(lambda: not any(engine.stats().running for engine in served.engines), "the engines idle")
    before = _metrics(http)
    client.completions.create(**COMPLETION, max_tokens=6)
    client.chat.completions.create(model=MODEL, messages=CHAT["messages"], stop="seven")
    client.chat.completions.create(model=MODEL, messages=CHAT["messages"])
    after = _metrics(http)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0)

    assert (grew("tp_zoo_requests_total", finish_reason="length"), grew("tp_zoo_requests_total", finish_reason="stop"),
            grew("tp_zoo_time_to_first_token_seconds_count")) == (1, 2, 3)
    assert sum(grew("tp_zoo_generated_tokens_total", engine=str(i)) for i in range(2)) > 6 + len(served.reply_ids)
    for i, engine in enumerate(served.engines):  # each engine's own stats
        stats = engine.stats()
        for name, value in (("tp_zoo_requests_running", stats.running), ("tp_zoo_requests_waiting", stats.waiting),
                            ("tp_zoo_kv_pages_used", stats.pages_used), ("tp_zoo_kv_pages_total", PAGES),
                            ("tp_zoo_generated_tokens_total", stats.generated_tokens),
                            ("tp_zoo_preemptions_total", stats.preemptions),
                            ("tp_zoo_prefix_cached_tokens_total", stats.prefix_cached_tokens)):
            assert after[(name, (("engine", str(i)),))] == value


def test_serve_refuses_bad_settings_before_loading(capsys):
    """`tp-zoo serve` checks its settings, the devices and the port before
    it loads the model (the preset here does not exist: it is never read)."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        for arguments, words in ((["--max-batch", "0"], "--max-batch 0: must be at least 1"),
                                 (["--kv-memory", "-1"], "--kv-memory -1.0: must be a positive number"),
                                 (["--api-key", ""], "--api-key is empty"),
                                 (["--tp", "4", "--dp", "4"], "needs 16 devices; 8 are available"),
                                 (["--port", port], f"Cannot listen on 127.0.0.1:{port}")):
            assert cli.main(["serve", "no_such_preset", *arguments]) == 2
            assert words in capsys.readouterr().err


# --- text -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2.5", "mistral_v0.3"])  # byte-level and sentencepiece-style tokens
def test_request_text_is_the_decoded_text(tmp_path, name):
    """Pieces of ids fed a few at a time, decoding started again every
    REDECODE_IDS ids, join to the text of all of them after the context; a
    stop string cuts it, and no piece ever shows a part of it."""
    from tp_zoo.demo import demo_text

    tokenizer = CheckpointTokenizer.from_directory(tmp_path, chat_templates.write_tokenizer(tmp_path, name),
                                                   adds_bos=False)
    ids = tokenizer.encode(demo_text()[:800] + " café ✓ — über" * 20)  # characters split over ids, often
    context, new = ids[:20], ids[20:]
    assert len(new) > 4 * REDECODE_IDS
    expected = _continuation(tokenizer, context, new)
    for step in (1, 3):
        text = RequestText(tokenizer.decode, context=context)
        pieces = [text.add(new[i:i + step]) for i in range(0, len(new), step)] + [text.finish()]
        assert "".join(pieces) == expected and not any("\ufffd" in piece for piece in pieces)
        assert not text.stopped
    stop = expected[len(expected) // 2:][:12]
    text = RequestText(tokenizer.decode, stop=["no such words", stop], context=context)
    pieces = [text.add([i]) for i in new] + [text.finish()]
    assert "".join(pieces) == expected[:expected.index(stop)] and text.stopped
