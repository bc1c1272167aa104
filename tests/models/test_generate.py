"""Sharded generation against transformers' greedy generate, and its inputs.

Greedy decoding of 32 new tokens must give exactly transformers' ids
(`generate(do_sample=False)`, each prompt alone) for every family, at
tp = 1 and 4, from a right-padded batch of prompts of different lengths
(and at tp values that pad the heads, for 9/3, 25 and 14/2 heads); a seeded
sampler must give the same ids at every tp.
"""

import jax
import keras_hub
import numpy as np
import pytest
import torch

import tp_zoo
from tests.models import checkpoints as ckpts
from tp_zoo import kernels
from tp_zoo.kernels import decode_attention
from tp_zoo.kernels import int8_matmul
from tp_zoo.models import generation

NEW_TOKENS = 32
PROMPTS = ([5, 17, 42, 8, 23, 61, 9], [33, 2, 71], [12, 4, 90, 56, 3])
FAMILIES = list(ckpts.FAMILY_CASES)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    return _greedy_reference(request.param, tmp_path_factory)


def _greedy_reference(name, tmp_path_factory):
    """(name, checkpoint dir, transformers' greedy continuation of each prompt)."""
    model = ckpts.build_model(ckpts.CASES[name])
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    expected = []
    with torch.no_grad():
        for prompt in PROMPTS:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 attention_mask=torch.ones((1, len(prompt)), dtype=torch.long))
            expected.append(out[0, len(prompt):].numpy())
    path = tmp_path_factory.mktemp(name)
    ckpts.save(model, path)
    return name, path, expected


def _batch(max_length):
    ids = np.zeros((len(PROMPTS), max_length), "int32")
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(PROMPTS):
        ids[row, : len(prompt)] = prompt
        mask[row, : len(prompt)] = 1
    return {"token_ids": ids, "padding_mask": mask}


@pytest.mark.parametrize("tp", [1, 4])  # tp=2: the padded-heads cases below, and every other test here
def test_greedy_matches_transformers(family, tp):
    _check_greedy(family, tp)


# Heads padded for tp: 9/3 -> 12 (a padded kv group), 25 -> 32 with MLP
# 100 -> 104, 14/2 -> 16 (padded inside each group, kv replicated).
PADDED = [("llama_9_heads_gqa3", 2), ("gpt2_25_heads_ffn_100", 8), ("qwen2_14_heads_gqa2", 4)]


@pytest.mark.parametrize("name,tp", PADDED, ids=[f"{n}-tp{t}" for n, t in PADDED])
def test_greedy_with_padded_heads_matches_transformers(tmp_path_factory, name, tp):
    _check_greedy(_greedy_reference(name, tmp_path_factory), tp)


def _check_greedy(reference, tp):
    name, path, expected = reference
    lm = tp_zoo.from_preset(path, tp=tp, dtype="float32", progress=False)
    lm.compile(sampler="greedy")
    max_length = max(map(len, PROMPTS)) + NEW_TOKENS
    out = lm.generate(_batch(max_length), max_length=max_length, stop_token_ids=None)
    ids = np.asarray(out["token_ids"])
    for row, prompt in enumerate(PROMPTS):
        np.testing.assert_array_equal(ids[row, : len(prompt)], prompt)
        got = ids[row, len(prompt) : len(prompt) + NEW_TOKENS]
        np.testing.assert_array_equal(got, expected[row], err_msg=f"{name} tp={tp} prompt {row}")
    print(f"\n{name} tp={tp}: {NEW_TOKENS} greedy tokens x {len(PROMPTS)} prompts identical to transformers")


def test_seeded_sampler_same_ids_at_every_tp(llama_path):
    results = []
    for tp in (1, 2, 4):
        lm = tp_zoo.from_preset(llama_path, tp=tp, dtype="float32", progress=False)
        lm.compile(sampler=keras_hub.samplers.TopKSampler(k=8, seed=1234))
        results.append(np.asarray(lm.generate(_batch(40), stop_token_ids=None)["token_ids"]))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])
    assert not np.array_equal(results[0][:, 7:], _greedy(llama_path)[:, 7:])  # it did sample


def _greedy(path):
    lm = tp_zoo.from_preset(path, tp=1, dtype="float32", progress=False)
    lm.compile(sampler="greedy")
    return np.asarray(lm.generate(_batch(40), stop_token_ids=None)["token_ids"])


def test_one_compilation_per_batch_and_length(llama_path):
    lm = tp_zoo.from_preset(llama_path, tp=2, dtype="float32", progress=False)
    lm.compile(sampler="greedy")
    lm.generate(_batch(30), stop_token_ids=None)
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        other = _batch(30)
        other["token_ids"][:, 0] = 77  # different prompts, same (batch, max_length)
        lm.generate(other, stop_token_ids=None)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def test_stop_token_and_strip_prompt(llama_path):
    lm = tp_zoo.from_preset(llama_path, tp=2, dtype="float32", progress=False)
    lm.compile(sampler="greedy")
    full = np.asarray(lm.generate(_batch(40), stop_token_ids=None)["token_ids"])
    stop = int(full[0, len(PROMPTS[0]) + 2])  # the third token row 0 generates
    out = lm.generate(_batch(40), stop_token_ids=[stop])
    row = out["token_ids"][0][out["padding_mask"][0]]
    first = len(PROMPTS[0]) + list(full[0, len(PROMPTS[0]) :]).index(stop)
    np.testing.assert_array_equal(row, full[0, : first + 1])  # up to and including the stop token
    stripped = lm.generate(_batch(40), stop_token_ids=None, strip_prompt=True)
    np.testing.assert_array_equal(
        stripped["token_ids"][1][stripped["padding_mask"][1]], full[1, len(PROMPTS[1]) :]
    )


@pytest.mark.parametrize(
    "inputs,kwargs,match",
    [
        ({"token_ids": np.array([[3, 0]]), "padding_mask": np.array([[0, 0]])}, {}, "Prompt 0 is empty"),
        ({"token_ids": np.array([[3, 4, 5]]), "padding_mask": np.array([[1, 1, 1]])}, {"max_length": 3},
         "leaves no room"),
        ({"token_ids": np.array([[3]]), "padding_mask": np.array([[1]])}, {"max_length": 65}, "beyond the model's 64"),
        ({"token_ids": np.array([[3, 100]]), "padding_mask": np.array([[1, 1]])}, {"max_length": 8},
         r"outside the vocab \[0, 100\): \[100\]"),
        ({"token_ids": np.array([[3, 4]]), "padding_mask": np.array([[0, 1]])}, {"max_length": 8}, "right padding"),
        ({"token_ids": np.array([[3]])}, {}, "exactly the keys"),
        (["hello", 5], {}, "mixing strings"),
        (["hello"], {}, "no tokenizer files"),
        ([], {}, "non-empty list"),
    ],
)
def test_bad_inputs_are_clear_errors(llama_path, inputs, kwargs, match):
    lm = tp_zoo.from_preset(llama_path, tp=1, dtype="float32", progress=False)
    with pytest.raises(ValueError, match=match):
        lm.generate(inputs, stop_token_ids=None, **kwargs)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_ragged_batch_steps_once_per_new_token(llama_path, tp, monkeypatch):
    """Prompts of 2 and 50 tokens, 9 new tokens each: each row equals
    transformers' greedy run of that prompt alone, and the compiled loop runs
    8 decode steps (the first token comes from the prefill), not 48 + 9."""
    from tp_zoo.models.generation import programs

    path, model = llama_path, ckpts.build_model(ckpts.CASES["llama_gqa_llama3_rope"])
    prompts = [[7, 3], list(np.random.RandomState(3).randint(1, 100, 50))]
    new = 9
    steps = []
    decode_step = programs.decode_step

    def counted(lm, tokens, positions, caches):
        jax.debug.callback(lambda: steps.append(1))
        return decode_step(lm, tokens, positions, caches)

    monkeypatch.setattr(programs, "decode_step", counted)
    lm = tp_zoo.from_preset(path, tp=tp, dtype="float32", progress=False)
    lm.compile(sampler="greedy")
    ids = np.zeros((2, 50), "int32")
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
        mask[row, : len(prompt)] = 1
    out = lm.generate({"token_ids": ids, "padding_mask": mask}, max_new_tokens=new, stop_token_ids=None,
                      strip_prompt=True)
    assert len(steps) == new - 1
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                                      attention_mask=torch.ones((1, len(prompt)), dtype=torch.long))
            np.testing.assert_array_equal(out["token_ids"][row, :new], expected[0, len(prompt):].numpy())
    assert out["padding_mask"].sum(axis=1).tolist() == [new, new]


def test_decode_step_communication_at_tp2(llama_path):
    """The compiled decode step all-reduces twice per layer (attention and MLP
    outputs) plus once for the embedding, and gathers nothing: the KV cache
    and the logits stay split."""
    from tp_zoo.models.generation import programs

    lm = tp_zoo.from_preset(llama_path, tp=2, dtype="float32", progress=False)
    layer_count = lm.backbone.num_layers
    caches = [block.attention.empty_cache(3, 64) for block in lm.backbone.transformer_layers]
    step = jax.jit(lambda tokens, positions, caches: programs.decode_step(lm, tokens, positions, caches))
    hlo = step.lower(np.array([1, 2, 3], "int32"), np.array([4, 9, 30], "int32"), caches).compile().as_text()
    all_reduces = [line for line in hlo.splitlines() if " all-reduce(" in line or " all-reduce-start(" in line]
    assert len(all_reduces) == 2 * layer_count + 1, "\n".join(all_reduces)
    assert "all-gather" not in hlo


LONG_WORKER = __import__("pathlib").Path(__file__).with_name("long_prompt_worker.py")


def test_long_prompt_host_memory_stays_linear(tmp_path):
    """2 rows x 12,000 tokens at tp=2 on the CPU devices: the whole process
    peaks under 3 GiB (dense attention scores alone would be 2 x 4 heads x
    12,000^2 x 4 bytes = 4.6 GB per layer)."""
    import subprocess
    import sys

    model = ckpts.build_model(ckpts.CASES["llama_gqa_llama3_rope"], max_position_embeddings=12288)
    ckpts.save(model, tmp_path)
    result = subprocess.run([sys.executable, str(LONG_WORKER), str(tmp_path), "12000", "4"],
                            capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "PYTHONPATH": str(LONG_WORKER.parents[2])})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    ids = [int(t) for t in lines["ids"].split()]
    assert len(ids) == 8 and all(0 <= t < 100 for t in ids)
    peak = int(lines["peak_bytes"])
    print(f"\n2 x 12,000-token prompts at tp=2: peak host memory {peak / 2**30:.2f} GiB")
    assert peak < 3 * 2**30


def test_batch_too_large_for_device_memory_is_a_clear_error(llama_path, monkeypatch):
    from tp_zoo.models import memory

    lm = tp_zoo.from_preset(llama_path, tp=2, dtype="float32", progress=False)
    lm.compile(sampler="greedy")
    monkeypatch.setattr(memory, "free_device_bytes", lambda lm: 1000)
    with pytest.raises(tp_zoo.errors.DeviceMemoryError, match=r"needs about [\d.]+ GiB per device .* is free"):
        lm.generate(_batch(40), stop_token_ids=None)


def test_out_of_memory_in_xla_becomes_the_same_error(llama_path, monkeypatch):
    from tp_zoo.models.generation import programs

    lm = tp_zoo.from_preset(llama_path, tp=1, dtype="float32", progress=False)
    lm.compile(sampler="greedy")

    def exhausted(lm):
        def program(*args, **kwargs):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return program

    monkeypatch.setattr(programs, "program", exhausted)
    with pytest.raises(tp_zoo.errors.DeviceMemoryError, match="needs about"):
        lm.generate(_batch(40), stop_token_ids=None)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        ({"max_new_tokens": 60}, r"A prompt of 7 tokens \+ max_new_tokens=60 is beyond the model's 64"),
        ({"max_new_tokens": 4, "max_length": 20}, "not both"),
    ],
)
def test_bad_lengths_are_clear_errors(llama_path, kwargs, match):
    lm = tp_zoo.from_preset(llama_path, tp=1, dtype="float32", progress=False)
    lm.compile(sampler="greedy")
    with pytest.raises(ValueError, match=match):
        lm.generate(_batch(20), stop_token_ids=None, **kwargs)


def test_a_prompt_as_long_as_the_positions_is_refused(llama_path):
    lm = tp_zoo.from_preset(llama_path, tp=1, dtype="float32", progress=False)
    ids = np.ones((1, 64), "int32")
    with pytest.raises(ValueError, match="A prompt of 64 tokens leaves no room"):
        lm.generate({"token_ids": ids, "padding_mask": ids}, stop_token_ids=None)


def test_whole_sequence_samplers_are_refused(llama_path):
    lm = tp_zoo.from_preset(llama_path, tp=1, dtype="float32", progress=False)
    lm.compile(sampler=keras_hub.samplers.BeamSampler(num_beams=2))
    with pytest.raises(ValueError, match="BeamSampler searches over whole sequences"):
        lm.generate(_batch(20), stop_token_ids=None)


def test_temperature_zero_is_greedy(llama_path):
    """As in OpenAI's API, whatever the sampler (keras_hub's divide the
    logits by the temperature: NaNs, so token 0 every time)."""
    greedy = _greedy(llama_path)
    lm = tp_zoo.from_preset(llama_path, tp=2, dtype="float32", progress=False)
    for sampler in [keras_hub.samplers.RandomSampler(temperature=0),
                    keras_hub.samplers.TopKSampler(k=5, temperature=0, seed=2),
                    keras_hub.samplers.TopPSampler(p=0.9, temperature=0.0, seed=2),
                    keras_hub.samplers.GreedySampler(temperature=0)]:
        lm.compile(sampler=sampler)
        np.testing.assert_array_equal(lm.generate(_batch(40), stop_token_ids=None)["token_ids"], greedy,
                                      err_msg=type(sampler).__name__)


@pytest.mark.parametrize(
    "sampler,message",
    [(keras_hub.samplers.RandomSampler(temperature=-0.5),
      "temperature=-0.5: must be a finite number of at least 0 (0 is greedy)."),
     (keras_hub.samplers.TopKSampler(k=5, temperature=float("nan")),
      "temperature=nan: must be a finite number of at least 0 (0 is greedy)."),
     (keras_hub.samplers.TopKSampler(k=0), "top_k=0: must be a whole number of at least 1."),
     (keras_hub.samplers.TopPSampler(p=0.9, k=0), "top_k=0: must be a whole number of at least 1."),
     (keras_hub.samplers.TopPSampler(p=0), "top_p=0: must be a number in (0, 1]."),
     (keras_hub.samplers.TopPSampler(p=1.5), "top_p=1.5: must be a number in (0, 1].")],
)
def test_meaningless_sampler_settings_are_refused(llama_path, sampler, message):
    lm = tp_zoo.from_preset(llama_path, tp=1, dtype="float32", progress=False)
    lm.compile(sampler=sampler)
    for call in (lambda: lm.generate(_batch(20), stop_token_ids=None),
                 lambda: list(generation.stream_ids(lm, _batch(20), stop_token_ids=None))):
        with pytest.raises(ValueError) as error:
            call()
        assert str(error.value) == message


def test_decode_step_updates_the_cache_in_place(llama_path):
    """Compiled with the caches donated, every cache buffer is aliased to its
    output (written in place) and the step's temporaries are well under the
    caches' size: no copy of a layer's cache, let alone of all of them."""
    from tp_zoo.models.generation import programs

    lm = tp_zoo.from_preset(llama_path, tp=2, dtype="float32", progress=False)
    caches = [block.attention.empty_cache(3, 4096) for block in lm.backbone.transformer_layers]
    per_device = sum(x.addressable_shards[0].data.nbytes for cache in caches for x in cache)
    step = jax.jit(lambda t, p, c: programs.decode_step(lm, t, p, c), donate_argnums=(2,))
    memory = step.lower(np.array([1, 2, 3], "int32"), np.array([4, 9, 30], "int32"), caches).compile()
    memory = memory.memory_analysis()
    assert memory.alias_size_in_bytes == per_device
    assert memory.temp_size_in_bytes < per_device / 2, (memory.temp_size_in_bytes, per_device)


def _forced_kernels(interpret):
    """The Pallas decode kernel and int8 product forced onto the CPU too,
    sized for the tiny model (blocks of 8 keys, 16 x 16 int8 blocks); with
    `interpret`, run by Pallas' interpreter, else compiled for GPUs."""
    return kernels.KernelConfigs(
        decode_attention=kernels.DecodeAttentionConfig(forced=True, interpret=interpret, block=8),
        int8_matmul=kernels.Int8MatmulConfig(forced=True, interpret=interpret, block_n=16, block_k=16),
    )


def _counted_kernel_calls(monkeypatch):
    """Counts the calls of the decode kernel and int8 product (the trace's:
    one per layer and program). Returns the counts."""
    calls = {"decode step": 0, "int8 product": 0}

    def counted(name, kernel):
        def run(*args):
            calls[name] += 1
            return kernel(*args)
        return run

    monkeypatch.setattr(decode_attention, "decode_step", counted("decode step", decode_attention.decode_step))
    monkeypatch.setattr(
        decode_attention, "decode_step_fused", counted("decode step", decode_attention.decode_step_fused)
    )
    monkeypatch.setattr(int8_matmul, "int8_matmul", counted("int8 product", int8_matmul.int8_matmul))
    return calls


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_gpu_kernels_inside_the_sharded_decode_step(llama_path, monkeypatch, quantize):
    """The Pallas decode attention and int8 product run only on GPUs; here
    Pallas' interpreter runs them inside the sharded decode step at tp=2,
    where shard_map asks each kernel which mesh axes its result varies over.
    Greedy ids: the same as the plain XLA path's at tp=1. (Not at dp > 1:
    the interpreter itself then fails shard_map's check, where a GPU's
    compiled kernel would not.)"""
    inputs = _batch(40)

    def greedy(tp):
        lm = tp_zoo.from_preset(llama_path, tp=tp, dtype="float32", progress=False, quantize=quantize)
        lm.compile(sampler="greedy")
        return np.asarray(lm.generate(inputs, stop_token_ids=None)["token_ids"])

    expected = greedy(1)
    calls = _counted_kernel_calls(monkeypatch)
    with kernels.configured(_forced_kernels(interpret=True)):
        np.testing.assert_array_equal(greedy(2), expected)
    assert calls["decode step"] > 0
    assert (calls["int8 product"] > 0) == (quantize == "int8")


def test_cache_buckets_are_whole_blocks_of_the_decode_kernel_in_force():
    """A width of 20 tokens: a cache of 64 positions with the default
    64-key blocks, of 24 (8 sizes per octave) with 8-key blocks."""
    from tp_zoo.models.generation import planning

    assert planning.bucket(20) == 64
    with kernels.configured(_forced_kernels(interpret=True)):
        assert planning.bucket(20) == 24


def test_generation_programs_are_keyed_by_the_kernel_configuration(llama_path, monkeypatch):
    """The same model and shapes (64-key blocks either way): generate() in a
    block that forces the decode kernel traces anew and takes it, rather
    than reusing the program compiled without it; the same greedy ids."""
    lm = tp_zoo.from_preset(llama_path, tp=1, dtype="float32", progress=False)
    lm.compile(sampler="greedy")
    calls = _counted_kernel_calls(monkeypatch)
    inputs = _batch(64)
    expected = lm.generate(inputs, stop_token_ids=None)["token_ids"]
    assert calls["decode step"] == 0
    forced = kernels.DecodeAttentionConfig(forced=True, interpret=True)
    with kernels.configured(kernels.KernelConfigs(decode_attention=forced)):
        got = lm.generate(inputs, stop_token_ids=None)["token_ids"]
    assert calls["decode step"] == lm.backbone.num_layers
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_decode_step_lowers_for_gpus_at_tp2(llama_path, quantize):
    """The decode step at tp=2, its Pallas kernels compiled as on a GPU
    (Triton), lowers for CUDA: the kernels' results declare how they vary
    across the mesh, as shard_map asks. The decode kernel writes the new keys
    and values into both caches itself, in place (each cache aliased to a
    result), and pads the queries itself, as the int8 kernel masks the
    rows past its activations': the step has no cache writes (scatters,
    dynamic-update-slices) and no padding."""
    from tp_zoo.models.generation import programs

    lm = tp_zoo.from_preset(llama_path, tp=2, dtype="bfloat16", progress=False, quantize=quantize)
    caches = [block.attention.empty_cache(3, 64) for block in lm.backbone.transformer_layers]
    step = jax.jit(lambda tokens, positions, caches: programs.decode_step(lm, tokens, positions, caches))
    with kernels.configured(_forced_kernels(interpret=False)):
        lowered = step.trace(np.array([1, 2, 3], "int32"), np.array([4, 9, 30], "int32"), caches)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    layers = lm.backbone.num_layers
    attention_calls = [line for line in text.splitlines() if 'name = "tp_zoo_decode_attention"' in line]
    assert len(attention_calls) == layers
    assert all(line.count("stablehlo.output_operand_alias<") == 2 for line in attention_calls)
    assert (text.count('name = "tp_zoo_int8_matmul"') > layers) == (quantize == "int8")
    # int8 values are stored as the kernel reads them: none is transposed per step.
    assert not [line for line in text.splitlines() if "stablehlo.transpose" in line and "xi8>" in line]
    assert "stablehlo.scatter" not in text and "stablehlo.dynamic_update_slice" not in text
    assert "stablehlo.pad" not in text
