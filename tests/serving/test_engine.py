"""The serving engine against `lm.generate`, each prompt alone.

A bfloat16 Llama (GQA, llama3 rope) written by transformers, as users'
checkpoints are, at tp=2 over simulated CPU devices. Requests arrive at
staggered iterations, prompts longer than the prefill chunk are fed in
chunks, the pool's pages are 16 positions.

Loaded in float32 (its bfloat16 values exactly), greedy ids and seeded
samples (keras_hub's random, top-k and top-p samplers, the same seeds) must
be `lm.generate`'s exactly, whatever else runs; under a pool too small for
every sequence (every test's), the newest are preempted and recomputed to
the same ids; prompts that begin alike take their first pages from the
prefix cache, with the same ids as if they computed them.
In bfloat16, where the engine's chunks and pages add in other orders than
generate's prefill (a rounding of 2^-8 that flips near-ties), each greedy
token must be the model's argmax to within that rounding, given the ids
before it. Cancelled, stopped and failed requests end alone, giving their
pages back.
"""

import keras_hub
import numpy as np
import pytest
import torch

import tp_zoo
from tests.models import checkpoints as ckpts
from tp_zoo import kernels
from tp_zoo.errors import QueueFullError
from tp_zoo.errors import RequestError
from tp_zoo.serving.engine import Engine
from tp_zoo.serving.requests import CANCELLED
from tp_zoo.serving.requests import ERROR
from tp_zoo.serving.requests import LENGTH
from tp_zoo.serving.requests import STOP
from tp_zoo.serving.requests import SamplingParams

VOCAB = 100
rs = np.random.RandomState(0)
# 1 token (a decode from the start), within a page, across pages and chunks.
PROMPTS = [[7], rs.randint(1, VOCAB, 5).tolist(), rs.randint(1, VOCAB, 23).tolist(), rs.randint(1, VOCAB, 40).tolist(),
           rs.randint(1, VOCAB, 12).tolist()]
# Prompts that begin with PROMPTS[3]'s first 32 tokens (two pages of 16).
SHARED = [PROMPTS[3][:32] + rs.randint(1, VOCAB, 4).tolist(), PROMPTS[3][:33]]
NEW = 24
MAX_STEPS = 400  # every drive below ends well within this many iterations


@pytest.fixture(scope="module")
def bf16_path(tmp_path_factory):
    model = ckpts.build_model(ckpts.CASES["llama_gqa_llama3_rope"], max_position_embeddings=128).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("llama_bf16")
    ckpts.save(model, path)
    return path


@pytest.fixture(scope="module")
def lm(bf16_path):
    return tp_zoo.from_preset(bf16_path, tp=2, dtype="float32", progress=False)


def _generated(lm, prompt, new, sampler="greedy"):
    lm.compile(sampler=sampler)
    out = lm.generate({"token_ids": np.array([prompt]), "padding_mask": np.ones((1, len(prompt)), bool)},
                      max_new_tokens=new, stop_token_ids=None, strip_prompt=True)
    return np.asarray(out["token_ids"])[0, :new].tolist()


@pytest.fixture(scope="module")
def greedy(lm):
    """Each prompt's greedy ids (PROMPTS, then SHARED), from one right-padded
    batch (generate's rows are each prompt alone's:
    tests/models/test_generate.py)."""
    lm.compile(sampler="greedy")
    prompts = PROMPTS + SHARED
    width = max(map(len, prompts))
    batch = {"token_ids": np.array([p + [0] * (width - len(p)) for p in prompts]),
             "padding_mask": np.arange(width)[None, :] < np.array([len(p) for p in prompts])[:, None]}
    out = np.asarray(lm.generate(batch, max_new_tokens=NEW, stop_token_ids=None, strip_prompt=True)["token_ids"])
    return out[:, :NEW].tolist()


def _drive(engine, requests, arrivals=None):
    """Submits request i (prompt, params) at iteration arrivals[i] and steps
    until all end: each one's (ids, finish reason)."""
    arrivals = arrivals or [0] * len(requests)
    ids, finished, seq_ids = [[] for _ in requests], [None] * len(requests), [None] * len(requests)

    def collect(i):
        def on_output(output):
            ids[i].extend(output.new_ids)
            finished[i] = output.finish_reason
        return on_output

    for step in range(MAX_STEPS):
        for i, (prompt, params) in enumerate(requests):
            if arrivals[i] == step:
                seq_ids[i] = engine.submit(prompt, params, collect(i))
        engine.step()
        if step >= max(arrivals) and all(finished):
            return ids, finished
    raise AssertionError(f"not finished after {MAX_STEPS} iterations: {finished}")


GREEDY = SamplingParams(temperature=0, max_tokens=NEW)


def _engine(lm, **settings):
    """An engine of one pool shape and chunk, so that tests share programs:
    8 pages of 16 positions (7 for sequences) for requests that need 2 to 4
    pages each, so that the newest running ones are preempted in turn."""
    return Engine(lm, **{"max_batch": 4, "page_size": 16, "kv_pages": 8, "prefill_chunk": 16, **settings})


def test_staggered_greedy_requests_match_generate(lm, greedy):
    """5 requests, 4 rows: one waits for a row; prompts of 23 and 40 tokens
    go in chunks of 16, while the others decode; the newest running
    sequences are preempted when pages run out, and recomputed."""
    engine = _engine(lm)
    ids, finished = _drive(engine, [(p, GREEDY) for p in PROMPTS], arrivals=[0, 0, 2, 3, 9])
    assert ids == greedy[: len(PROMPTS)]
    assert finished == [LENGTH] * len(PROMPTS)
    stats = engine.stats()
    assert stats.preemptions > 0
    assert (stats.running, stats.waiting, stats.pages_used, stats.generated_tokens) == (0, 0, 0, NEW * len(PROMPTS))


def test_prompts_beginning_alike_take_the_cached_pages(lm, greedy):
    """Prefix caching: after PROMPTS[3] (40 tokens) has run, its 2 whole
    pages stay cached; two prompts that begin with its first 32 tokens take
    them together and feed only the rest, then PROMPTS[3] again takes them;
    each gets generate's ids."""
    engine = _engine(lm)
    ids, _ = _drive(engine, [(PROMPTS[3], GREEDY)])
    assert ids == [greedy[3]] and engine.stats().prefix_cached_tokens == 0
    ids, _ = _drive(engine, [(prompt, GREEDY) for prompt in SHARED])
    assert ids == greedy[len(PROMPTS):] and engine.stats().prefix_cached_tokens == 2 * 32
    ids, _ = _drive(engine, [(PROMPTS[3], GREEDY)])
    assert ids == [greedy[3]] and engine.stats().prefix_cached_tokens == 3 * 32
    assert engine.stats().pages_used == 0


SAMPLERS = [  # (engine settings, the keras_hub sampler lm.generate draws alike)
    (dict(temperature=0.7, seed=11), lambda: keras_hub.samplers.RandomSampler(temperature=0.7, seed=11)),
    (dict(temperature=1.3, top_k=5, seed=12), lambda: keras_hub.samplers.TopKSampler(5, temperature=1.3, seed=12)),
    (dict(top_p=0.8, seed=13), lambda: keras_hub.samplers.TopPSampler(0.8, seed=13)),
    (dict(top_p=0.9, top_k=7, temperature=0.9, seed=14),
     lambda: keras_hub.samplers.TopPSampler(0.9, k=7, temperature=0.9, seed=14)),
]


def test_seeded_samples_match_generate_beside_other_requests(lm, greedy):
    requests = [(PROMPTS[i + 1], SamplingParams(max_tokens=NEW, **settings)) for i, (settings, _) in
                enumerate(SAMPLERS)]
    expected = [_generated(lm, prompt, NEW, sampler()) for (prompt, _), (_, sampler) in zip(requests, SAMPLERS)]
    assert len({tuple(e) for e in expected}) == len(expected)
    engine = _engine(lm)
    ids, _ = _drive(engine, requests + [(PROMPTS[0], GREEDY)], arrivals=[0, 1, 1, 4, 6])
    assert ids[:-1] == expected
    assert ids[-1] == greedy[0]


def test_cancel_failure_and_stop_end_alone(lm, greedy):
    engine = _engine(lm)
    outputs = {i: [] for i in range(3)}
    seq_ids = [engine.submit(PROMPTS[i + 1], GREEDY, lambda o, i=i: outputs[i].append(o)) for i in outputs]
    for _ in range(4):
        engine.step()
    engine.cancel(seq_ids[0])
    engine.step()
    assert outputs[0][-1].finish_reason == CANCELLED and outputs[0][-1].new_ids == ()
    assert engine.stats().running == 2
    # The next program fails: its rows end with the error, and the engine
    # goes on with later requests.
    program = engine._program
    engine._program = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("device lost"))
    engine.step()
    engine._program = program
    for i in (1, 2):
        assert (outputs[i][-1].finish_reason, outputs[i][-1].error) == (ERROR, "RuntimeError: device lost")
    assert engine.stats().pages_used == 0
    ids, finished = _drive(engine, [(PROMPTS[4], GREEDY)])
    assert ids == [greedy[4]] and finished == [LENGTH]
    # A stop token ends its request, included as its last id.
    stop = greedy[2][5]
    ids, finished = _drive(engine, [(PROMPTS[2], SamplingParams(temperature=0, max_tokens=NEW, stop_token_ids=(stop,)))])
    assert ids == [greedy[2][: greedy[2].index(stop) + 1]] and finished == [STOP]


class _Unreadable:
    """A program's tokens whose device failed after the program was sent:
    reading them raises."""

    def __array__(self, *args, **kwargs):
        raise RuntimeError("device lost")


def test_a_program_failing_when_read_fails_its_rows_alone(lm, greedy):
    """A program whose tokens fail when read (an error on the device),
    after the next program was sent: its rows end with the error; that next
    program is dropped, and a request that joined in it is recomputed from
    its ids, to generate's."""
    engine = _engine(lm)
    outputs = {i: [] for i in (1, 2, 4)}
    for i in (1, 2):
        engine.submit(PROMPTS[i], GREEDY, outputs[i].append)
    for _ in range(4):
        engine.step()
    dispatch = engine._dispatch

    def failing_once(*args):
        engine._dispatch = dispatch
        flight = dispatch(*args)
        flight.tokens = _Unreadable()
        return flight

    engine._dispatch = failing_once
    engine.step()  # sends the failing program
    engine.submit(PROMPTS[4], GREEDY, outputs[4].append)
    engine.step()  # sends the next (PROMPTS[4]'s prompt in it), then reads the failing one
    for i in (1, 2):
        assert (outputs[i][-1].finish_reason, outputs[i][-1].error) == (ERROR, "RuntimeError: device lost")
    for _ in range(MAX_STEPS):
        if outputs[4] and outputs[4][-1].finish_reason:
            break
        engine.step()
    assert [t for o in outputs[4] for t in o.new_ids] == greedy[4] and outputs[4][-1].finish_reason == LENGTH
    assert engine.stats().pages_used == 0


@pytest.mark.parametrize("params,param", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(seed=-1), "seed"), (dict(stop_token_ids=[3]), "stop_token_ids"),
])
def test_bad_sampling_params_name_their_field(params, param):
    with pytest.raises(RequestError, match=f"^{param}=") as error:
        SamplingParams(**params)
    assert error.value.param == param


def test_bad_requests_and_a_full_queue_are_refused(lm):
    engine = Engine(lm, max_batch=2, page_size=16, kv_pages=6, max_waiting=2)
    for prompt, params, param in [([], GREEDY, "prompt"), ([5, VOCAB], GREEDY, "prompt"),
                                  ([5] * 100, SamplingParams(max_tokens=29), "max_tokens"),
                                  ([5] * 70, GREEDY, "max_tokens")]:  # 94 positions: 6 pages, the pool has 5
        with pytest.raises(RequestError) as error:
            engine.submit(prompt, params, lambda output: None)
        assert error.value.param == param
    for _ in range(2):
        engine.submit([1, 2], GREEDY, lambda output: None)
    with pytest.raises(QueueFullError, match="2 requests are waiting"):
        engine.submit([1, 2], GREEDY, lambda output: None)


def test_engine_thread_serves_requests_from_other_threads(lm, greedy):
    import threading

    engine = _engine(lm)
    done = {i: threading.Event() for i in range(2)}
    ids = {i: [] for i in done}

    def on_output(i):
        def collect(output):
            ids[i].extend(output.new_ids)
            if output.finish_reason:
                done[i].set()
        return collect

    engine.start()
    try:
        assert engine.running
        for i in done:
            engine.submit(PROMPTS[i], GREEDY, on_output(i))
        assert all(event.wait(timeout=60) for event in done.values())
    finally:
        engine.stop()
    assert not engine.running
    assert [ids[i] for i in done] == greedy[:2]


def test_paged_kernel_logic_in_the_engine(lm, greedy):
    """The Pallas paged decode kernel, forced onto the CPU (its interpreter):
    the same greedy ids."""
    forced = kernels.PagedAttentionConfig(forced=True, interpret=True)
    with kernels.configured(kernels.KernelConfigs(paged_attention=forced)):
        engine = _engine(lm)
    ids, _ = _drive(engine, [(p, GREEDY) for p in PROMPTS[:3]])
    assert ids == greedy[:3]


def test_bf16_greedy_tokens_are_the_argmax_within_rounding(bf16_path):
    lm = tp_zoo.from_preset(bf16_path, tp=2, progress=False)
    assert lm.backbone.token_embedding.embeddings.dtype == "bfloat16"
    engine = _engine(lm)
    ids, finished = _drive(engine, [(p, GREEDY) for p in PROMPTS], arrivals=[0, 0, 2, 3, 9])
    assert finished == [LENGTH] * len(PROMPTS)
    sequences = [prompt + new for prompt, new in zip(PROMPTS, ids)]
    width = max(map(len, sequences))
    batch = np.array([s + [0] * (width - len(s)) for s in sequences])
    mask = np.arange(width)[None, :] < np.array([len(s) for s in sequences])[:, None]
    all_logits = np.asarray(lm({"token_ids": batch, "padding_mask": mask}), "float32")
    for prompt, new, logits in zip(PROMPTS, ids, all_logits):
        logits = logits[len(prompt) - 1: len(prompt) - 1 + NEW]  # those each new token was chosen from
        chosen = np.take_along_axis(logits, np.array(new)[:, None], axis=1)[:, 0]
        # bfloat16 keeps 8 bits: 2^-8 of the largest logit per rounding, a few of them
        assert np.all(logits.max(axis=1) - chosen <= 2e-2 * np.abs(logits).max()), (prompt, new)


def test_a_sliding_window_matches_generate(tmp_path):
    """Mistral's sliding window (4 keys, across pages and chunks): greedy ids
    equal generate's, float32."""
    ckpts.save(ckpts.build_model(ckpts.CASES["mistral_sliding_window"]), tmp_path)
    lm = tp_zoo.from_preset(tmp_path, tp=2, dtype="float32", progress=False)
    prompts = [p for p in PROMPTS if len(p) < 40][:3]
    expected = [_generated(lm, [t % lm.backbone.vocab_size for t in p], 16) for p in prompts]
    engine = _engine(lm)
    ids, _ = _drive(engine, [([t % lm.backbone.vocab_size for t in p], SamplingParams(temperature=0, max_tokens=16))
                             for p in prompts], arrivals=[0, 1, 3])
    assert ids == expected
