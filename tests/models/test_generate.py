"""Sharded generation against transformers' greedy generate, and its inputs.

Greedy decoding of 32 new tokens must give exactly transformers' ids
(`generate(do_sample=False)`, each prompt alone) for every family, at
tp = 1, 2 and 4, from a right-padded batch of prompts of different lengths;
a seeded sampler must give the same ids at every tp.
"""

import jax
import keras_hub
import numpy as np
import pytest
import torch

import tp_zoo
from tests.models import checkpoints as ckpts

NEW_TOKENS = 32
PROMPTS = ([5, 17, 42, 8, 23, 61, 9], [33, 2, 71], [12, 4, 90, 56, 3])
FAMILIES = ["opt_pre_ln", "opt_post_ln_proj", "gpt2", "llama_gqa_llama3_rope", "mistral_sliding_window", "qwen2_bias_untied"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, checkpoint dir, transformers' greedy continuation of each prompt)."""
    model = ckpts.build_model(ckpts.CASES[request.param])
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    expected = []
    with torch.no_grad():
        for prompt in PROMPTS:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 attention_mask=torch.ones((1, len(prompt)), dtype=torch.long))
            expected.append(out[0, len(prompt):].numpy())
    path = tmp_path_factory.mktemp(request.param)
    ckpts.save(model, path)
    return request.param, path, expected


def _batch(max_length):
    ids = np.zeros((len(PROMPTS), max_length), "int32")
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(PROMPTS):
        ids[row, : len(prompt)] = prompt
        mask[row, : len(prompt)] = 1
    return {"token_ids": ids, "padding_mask": mask}


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_greedy_matches_transformers(family, tp):
    name, path, expected = family
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


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_gen")
    ckpts.save(ckpts.build_model(ckpts.CASES["llama_gqa_llama3_rope"]), path)
    return path


def test_seeded_sampler_same_ids_at_every_tp(llama_dir):
    results = []
    for tp in (1, 2, 4):
        lm = tp_zoo.from_preset(llama_dir, tp=tp, dtype="float32", progress=False)
        lm.compile(sampler=keras_hub.samplers.TopKSampler(k=8, seed=1234))
        results.append(np.asarray(lm.generate(_batch(40), stop_token_ids=None)["token_ids"]))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])
    assert not np.array_equal(results[0][:, 7:], _greedy(llama_dir)[:, 7:])  # it did sample


def _greedy(path):
    lm = tp_zoo.from_preset(path, tp=1, dtype="float32", progress=False)
    lm.compile(sampler="greedy")
    return np.asarray(lm.generate(_batch(40), stop_token_ids=None)["token_ids"])


def test_one_compilation_per_batch_and_length(llama_dir):
    lm = tp_zoo.from_preset(llama_dir, tp=2, dtype="float32", progress=False)
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


def test_stop_token_and_strip_prompt(llama_dir):
    lm = tp_zoo.from_preset(llama_dir, tp=2, dtype="float32", progress=False)
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
def test_bad_inputs_are_clear_errors(llama_dir, inputs, kwargs, match):
    lm = tp_zoo.from_preset(llama_dir, tp=1, dtype="float32", progress=False)
    with pytest.raises(ValueError, match=match):
        lm.generate(inputs, stop_token_ids=None, **kwargs)
