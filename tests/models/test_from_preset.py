"""`tp_zoo.from_preset` on tiny random checkpoints written by transformers.

The reference is transformers itself (torch, float32, eager attention) run on
the very checkpoint directory `from_preset` loads; logits are compared on the
real (unpadded) positions of a right-padded batch, to 1e-4 absolute, for every
(config, tp) pair. `pytest -s` prints the measured max |diff| per pair and a
table at the end of the module.

Head counts and MLP widths that tp does not divide are padded with inert
heads/units: those models match transformers to the same 1e-4, and the same
model at a tp that divides (no padding) to 1e-5 x max(1, max |logit|).

Also: the variables of a tp=4 model are really sharded, and every documented
checkpoint/config error is raised as a ValueError with a useful message.
"""

import dataclasses
import gc
import json
import re
import shutil
import time

import numpy as np
import pytest

import tp_zoo
from tests.helpers import assert_close
from tests.helpers import is_padded
from tests.helpers import max_diff
from tests.helpers import padded_entries
from tests.models import checkpoints as ckpts

ATOL = 1e-4


@dataclasses.dataclass
class Checkpoint:
    name: str
    path: str
    config: dict  # the saved config.json
    vocab_size: int
    ids: np.ndarray
    mask: np.ndarray
    ref: np.ndarray  # transformers logits, (batch, seq, vocab)


class _Checkpoints:
    """Builds each checkpoint (and its reference logits) once per session."""

    def __init__(self, factory):
        self._factory = factory
        self._cache = {}

    def get(self, name, spec=None):
        if name not in self._cache:
            spec = spec or ckpts.CASES[name]
            model = ckpts.build_model(spec)
            vocab = model.config.vocab_size
            ids, mask = ckpts.batch(vocab)
            ref = ckpts.reference_logits(model, ids, mask)
            path = self._factory.mktemp(name)
            config = ckpts.save(model, path)
            del model
            self._cache[name] = Checkpoint(name, str(path), config, vocab, ids, mask, ref)
        return self._cache[name]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    return _Checkpoints(tmp_path_factory)


@pytest.fixture(scope="module")
def diff_table():
    table = {}
    yield table
    if table:
        lines = [f"{'config':<24} {'tp':>3} {'max |diff|':>12} {'load+run s':>11}"]
        for (name, tp), (diff, secs) in table.items():
            lines.append(f"{name:<24} {tp:>3} {diff:>12.3e} {secs:>11.1f}")
        print("\n\nfrom_preset vs transformers (real positions only):\n" + "\n".join(lines))


# The tp=4 tied Llama is loaded once for both its logits and its sharding test.
SHARED = ("llama_mha_tied", 4)


@pytest.fixture(scope="module")
def kept_models():
    models = {}
    yield models
    models.clear()
    gc.collect()


# (checkpoint, a tp that pads its heads or MLP, a tp that divides them)
PADDED = [
    ("llama_9_heads_gqa3", 2, 3),
    ("llama_9_heads_gqa3", 4, 3),
    ("gpt2_25_heads_ffn_100", 2, 5),
    ("gpt2_25_heads_ffn_100", 4, 5),
    ("gpt2_25_heads_ffn_100", 8, 5),
    ("qwen2_14_heads_gqa2", 4, 2),
    ("qwen2_14_heads_gqa2", 8, 2),
]


@pytest.fixture(scope="module")
def kept_logits():
    """(name, tp) -> logits of the checkpoints of PADDED, kept from the transformers comparison."""
    return {}


def _load(ck_or_path, tp, **kwargs):
    path = ck_or_path.path if isinstance(ck_or_path, Checkpoint) else str(ck_or_path)
    return tp_zoo.from_preset(path, tp=tp, dtype="float32", progress=False, **kwargs)


def _logits(lm, ck):
    return np.asarray(lm({"token_ids": ck.ids, "padding_mask": ck.mask}))


# --------------------------------------------------------------------------
# Logits against transformers
# --------------------------------------------------------------------------

CASES = [(name, tp) for name, spec in ckpts.CASES.items() for tp in spec[3]]


def test_saved_configs_keep_the_features_under_test(checkpoints):
    """Guard against transformers silently dropping a config feature, which
    would make the corresponding logits test vacuous."""
    assert ckpts.rope_type_of(checkpoints.get("llama_gqa_llama3_rope").config) == "llama3"
    gqa = checkpoints.get("llama_gqa_llama3_rope").config
    assert gqa["head_dim"] == 8 and gqa["num_key_value_heads"] == 2
    assert ckpts.rope_type_of(checkpoints.get("llama_mqa_linear_rope").config) == "linear"
    assert checkpoints.get("mistral_sliding_window").config["sliding_window"] == 4
    post = checkpoints.get("opt_post_ln_proj").config
    assert post["do_layer_norm_before"] is False and post["word_embed_proj_dim"] == 16
    assert checkpoints.get("llama_mha_tied").config["tie_word_embeddings"] is True
    assert checkpoints.get("qwen2_bias_untied").config["tie_word_embeddings"] is False


def test_mistral_reference_depends_on_the_window(checkpoints):
    """The transformers reference really applies sliding_window=4 at length 10
    (else the Mistral case would not test the window)."""
    ck = checkpoints.get("mistral_sliding_window")
    full = ckpts.reference_logits(
        ckpts.build_model(ckpts.CASES["mistral_sliding_window"], sliding_window=None),
        ck.ids, ck.mask,
    )
    real = ck.mask.astype(bool)
    diff = max_diff(ck.ref[real], full[real])
    print(f"\nmistral: window=4 vs no window, transformers logits max |diff| {diff:.3e}")
    assert diff > 1e-2


@pytest.mark.parametrize("name,tp", CASES, ids=[f"{n}-tp{t}" for n, t in CASES])
def test_logits_match_transformers(checkpoints, diff_table, kept_models, kept_logits, name, tp):
    ck = checkpoints.get(name)
    start = time.perf_counter()
    lm = _load(ck, tp)
    if (name, tp) == SHARED:
        kept_models[SHARED] = lm
    import keras_hub

    assert isinstance(lm, keras_hub.models.CausalLM), type(lm)
    got = _logits(lm, ck)
    if any(name == p[0] for p in PADDED):
        kept_logits[name, tp] = got
    secs = time.perf_counter() - start
    del lm
    gc.collect()

    assert got.shape == ck.ref.shape, (got.shape, ck.ref.shape)
    real = ck.mask.astype(bool)
    assert np.all(np.isfinite(got[real])), f"{name} tp={tp}: non-finite logits"
    diff = max_diff(ck.ref[real], got[real])
    diff_table[(name, tp)] = (diff, secs)
    print(f"\n{name:<24} tp={tp}: max |diff| {diff:.3e} ({secs:.1f}s)")
    if diff > ATOL:
        err = np.abs(ck.ref - got) * real[..., None]
        b, s, v = np.unravel_index(np.argmax(err), err.shape)
        pytest.fail(
            f"{name} tp={tp}: max |diff| {diff:.3e} > {ATOL:.0e} at batch {b}, "
            f"position {s}, token {v} (ref {ck.ref[b, s, v]:.5f}, got {got[b, s, v]:.5f})"
        )


@pytest.mark.parametrize("name,tp,dividing_tp", PADDED, ids=[f"{n}-tp{t}-vs-tp{d}" for n, t, d in PADDED])
def test_padded_heads_match_a_tp_that_divides(checkpoints, kept_logits, name, tp, dividing_tp):
    ck = checkpoints.get(name)
    logits = {t: kept_logits.get((name, t)) for t in (tp, dividing_tp)}
    for t in logits:
        if logits[t] is None:  # run on its own
            logits[t] = _logits(_load(ck, t), ck)
    real = ck.mask.astype(bool)
    diff = assert_close(logits[dividing_tp][real], logits[tp][real], f"{name}: tp={tp} (padded) vs tp={dividing_tp}")
    print(f"\n{name}: tp={tp} (padded) vs tp={dividing_tp}: max |diff| {diff:.3e}")


def test_padding_is_loaded_as_zeros_and_never_read(checkpoints):
    """Qwen2 14/2 heads at tp=8: 16 query heads, MLP 100 -> 104. Every padded
    entry is exactly zero, and the loader reads each tensor byte once: the
    real rows only, nothing past them."""
    lm = _load(checkpoints.get("qwen2_14_heads_gqa2"), 8)
    attention = lm.backbone.transformer_layers[0].attention
    assert (attention.padded_heads, attention.padded_kv_heads, attention.kv_replicated) == (16, 2, True)
    assert lm.backbone.transformer_layers[0].mlp.up.kernel.shape == (56, 2, 104)  # gate and up
    padded = [v for v in lm.weights if is_padded(v)]
    assert {re.sub(r"^transformer_layer_\d+/", "", v.path) for v in padded} >= {
        "attention/qkv/kernel", "attention/qkv/bias", "attention/output/kernel",
        "mlp/gate_up/kernel", "mlp/down/kernel", "token_embedding/embeddings",
    }
    for v in padded:
        assert not np.any(padded_entries(v)), v.path
    assert lm.load_stats["bytes_read"] == lm.load_stats["checkpoint_bytes"]


# --------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------


def test_tp4_variables_are_sharded(checkpoints, kept_models):
    # 4 heads, 4 kv heads, vocab 128: every matrix can be split 4 ways.
    lm = kept_models.get(SHARED)
    if lm is None:  # run on its own
        lm = _load(checkpoints.get(SHARED[0]), SHARED[1])
    rows, split, odd = [], [], []
    for v in lm.weights:
        arr = v.value
        shard = arr.addressable_shards[0].data.size
        k = arr.size // shard if shard and arr.size % shard == 0 else None
        rows.append(f"  {v.path:<60} {str(tuple(arr.shape)):<14} k={k}")
        if k == 4:
            split.append(v)
        elif k != 1:
            odd.append((v.path, arr.shape, shard))
    print("\ntp=4 llama_mha_tied variables:\n" + "\n".join(rows))

    assert not odd, f"variables neither replicated nor split 4 ways: {odd}"
    # Every large tensor of this model is the token table, an attention
    # projection or an MLP kernel: all must be split 4 ways.
    split_ids = {id(v) for v in split}
    replicated_large = [
        v.path for v in lm.weights if v.value.size >= 1024 and id(v) not in split_ids
    ]
    assert not replicated_large, f"replicated instead of sharded: {replicated_large}"
    # Together they account for at least the embedding (128 x 32), q/k/v/o
    # (4 x 32 x 32) and gate/up/down (3 x 32 x 64) of both layers.
    expected = 128 * 32 + 2 * (4 * 32 * 32 + 3 * 32 * 64)
    assert sum(v.value.size for v in split) >= expected
    sizes = sorted(v.value.size for v in split)
    assert 128 * 32 in sizes, f"token embedding (4096 values) not split: {sizes}"


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def _copy(ck, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(ck.path, dst)
    return dst


def test_pickle_only_checkpoint_refused(checkpoints, tmp_path):
    import safetensors.torch
    import torch

    ck = checkpoints.get("llama_mha_tied")
    dst = tmp_path / "bin_only"
    dst.mkdir()
    shutil.copy(f"{ck.path}/config.json", dst / "config.json")
    state = safetensors.torch.load_file(f"{ck.path}/model.safetensors")
    torch.save(state, dst / "pytorch_model.bin")
    assert not list(dst.glob("*.safetensors"))
    with pytest.raises(ValueError, match="allow_pickle"):
        _load(dst, 1)


def test_unsupported_architecture(checkpoints, tmp_path):
    dst = _copy(checkpoints.get("llama_mha_tied"), tmp_path)
    config = json.loads((dst / "config.json").read_text())
    config["model_type"] = "bert"
    config["architectures"] = ["BertForMaskedLM"]
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Unsupported architecture"):
        _load(dst, 1)


def test_truncated_safetensors(checkpoints, tmp_path):
    dst = _copy(checkpoints.get("llama_mha_tied"), tmp_path)
    f = dst / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated|corrupt"):
        _load(dst, 1)


def _rewrite_safetensors(path, edit):
    import safetensors.torch

    state = safetensors.torch.load_file(str(path))
    edit(state)
    safetensors.torch.save_file(state, str(path), metadata={"format": "pt"})


def test_missing_tensor(checkpoints, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    dst = _copy(checkpoints.get("llama_mha_tied"), tmp_path)
    _rewrite_safetensors(dst / "model.safetensors", lambda s: s.pop(name))
    with pytest.raises(ValueError, match=re.escape(name)):
        _load(dst, 1)


def test_wrong_shape_tensor(checkpoints, tmp_path):
    import torch

    name = "model.layers.1.mlp.down_proj.weight"  # (32, 64) in the checkpoint
    dst = _copy(checkpoints.get("llama_mha_tied"), tmp_path)

    def edit(state):
        assert tuple(state[name].shape) == (32, 64)
        state[name] = torch.zeros(32, 48)

    _rewrite_safetensors(dst / "model.safetensors", edit)
    with pytest.raises(ValueError, match=rf"(?s)(?=.*{re.escape(name)})(?=.*shape)"):
        _load(dst, 1)


def test_unknown_preset_suggests_close_name():
    # "opt_125m" not followed by another "m": the suggestion, not the echo
    # of the misspelt name.
    with pytest.raises(ValueError, match=r"opt_125m(?!m)"):
        tp_zoo.from_preset("opt_125mm", dtype="float32", progress=False)


def test_list_presets():
    names = set(tp_zoo.list_presets())
    expected = {"opt_125m", "gpt2", "llama3_8b", "mistral_7b", "qwen2.5_0.5b",
                "smollm2_135m", "tinyllama_1.1b"}
    assert expected <= names, f"missing presets: {sorted(expected - names)}"
