"""`tp-zoo serve` as users run it: a server process on 127.0.0.1 with the
real engine, a tiny Llama (Qwen2.5's chat template and a small BPE
tokenizer) at tp=2 over simulated CPU devices, driven by the `openai`
client. Greedy answers must be `lm.generate`'s for each prompt alone (same
text, and as many tokens): completions and chat, streamed and not, and six
clients arriving at staggered times into 3 rows and a pool of 5 pages, so
that requests wait, and running ones are preempted (as /metrics counts)
and recomputed. A client that leaves a stream frees its row at once.
"""

import os
import re
import subprocess
import sys
import threading
import time

import httpx2
import openai
import pytest

import tp_zoo
from tests.models import chat_templates
from tests.models import checkpoints as ckpts

START_SECONDS = 180  # the server loads and answers within this
NEW = 20
LONG = 100  # a prompt and this many new tokens take 2 pages: 3 rows of them do not fit in 5
PROMPTS = ["Four score and seven years ago", "We are met on a great battle-field", "Now we are engaged",
           "It is for us the living", "The world will little note", "government of the people"]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("served")
    config = chat_templates.write_tokenizer(directory, "qwen2.5")
    model = ckpts.build_model(ckpts.CASES["llama_gqa_llama3_rope"], max_position_embeddings=256,
                              num_hidden_layers=1, **config)
    ckpts.save(model, directory)
    return directory


@pytest.fixture(scope="module")
def lm(checkpoint):
    lm = tp_zoo.from_preset(checkpoint, tp=2, progress=False)
    lm.compile(sampler="greedy")
    return lm


@pytest.fixture(scope="module")
def server(checkpoint):
    """The server's base URL; the process is ended after the module."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    # Pages of 64 positions, 4 KiB each per device here (one layer, one kv
    # head of 8 per device, float32): 6 pages, 5 for sequences.
    command = [sys.executable, "-m", "tp_zoo.cli", "serve", str(checkpoint), "--tp", "2", "--port", "0",
               "--max-batch", "3", "--served-model-name", "served", "--kv-memory", str(6 * 4096 / 2**30)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, found = [], threading.Event()
    url = []

    def read():
        for line in process.stdout:
            lines.append(line)
            match = re.search(r"serving \S+ at (http://127\.0\.0\.1:\d+/v1)", line)
            if match and not url:
                url.append(match.group(1))
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert found.wait(START_SECONDS), "server did not start:\n" + "".join(lines[-30:])
        yield url[0]
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _client(server):
    return openai.OpenAI(base_url=server, api_key="none", max_retries=0, timeout=120)


def _expected(lm, prompt, new=NEW):
    """(text, new token count) of lm.generate for a string or conversation alone."""
    stream = lm.generate(prompt, max_new_tokens=new, stream=True)
    text = "".join(stream)
    return text, len(stream.new_ids)


def _metric(server, name):
    """A metric's value, summed over its engines."""
    text = httpx2.get(server.removesuffix("/v1") + "/metrics", timeout=10).text
    values = re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
    assert values, f"no {name} in /metrics"
    return sum(map(float, values))


def test_staggered_clients_get_generate_s_answers(server, lm):
    answers = [None] * len(PROMPTS)

    def ask(i):
        # 20 ms apart: a request's 100 steps take longer, so 3 run together
        # and the third to need a second page finds none.
        time.sleep(0.02 * i)
        answers[i] = _client(server).completions.create(model="served", prompt=PROMPTS[i], max_tokens=LONG,
                                                        temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=START_SECONDS)
    for prompt, answer in zip(PROMPTS, answers):
        text, count = _expected(lm, prompt, LONG)
        assert (answer.choices[0].text, answer.usage.completion_tokens) == (text, count), prompt
    assert _metric(server, "tp_zoo_preemptions_total") > 0


def test_streamed_completion_and_chat_match_generate(server, lm):
    client = _client(server)
    stream = client.completions.create(model="served", prompt=PROMPTS[0], max_tokens=NEW, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == _expected(lm, PROMPTS[0])[0]
    reply, count = _expected(lm, CHAT)
    answer = client.chat.completions.create(model="served", messages=CHAT, max_tokens=NEW, temperature=0)
    assert (answer.choices[0].message.content, answer.usage.completion_tokens) == (reply, count)
    chunks = client.chat.completions.create(model="served", messages=CHAT, max_tokens=NEW, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply


def test_a_client_leaving_a_stream_frees_its_row(server):
    stream = _client(server).completions.create(model="served", prompt=PROMPTS[1], max_tokens=200, temperature=0,
                                                stream=True)
    next(iter(stream))
    assert _metric(server, "tp_zoo_requests_running") == 1
    stream.close()
    deadline = time.monotonic() + 10
    while _metric(server, "tp_zoo_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(server, "tp_zoo_requests_running") == 0
    assert _metric(server, "tp_zoo_kv_pages_used") == 0
