"""LoRA adapters in PEFT's format, both ways, against peft itself.

Checkpoints are written by transformers (tests/models/checkpoints.py):
Llama with 9 query / 3 key-value heads, which tp 2 and 4 pad to 12 / 4
(so adapters of padded projections are cut and padded), and OPT; in
float32 and bfloat16. A tp_zoo adapter saved with `save_peft_adapter`
must give, in `peft.PeftModel.from_pretrained(transformers model)`, the
logits tp_zoo computes; an adapter made by `peft.get_peft_model` (random
nonzero B) must give in tp_zoo, at tp 1, 2 and 4, the PeftModel's logits.
Bad adapters are refused in one line, the model left as it was.
"""

import json
import shutil

import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

import tp_zoo
from tests.helpers import assert_close
from tests.helpers import is_padded
from tests.helpers import padded_entries
from tests.models import checkpoints as ckpts
from tp_zoo.checkpoint import peft as tp_peft
from tp_zoo.checkpoint.peft import load_peft_adapter
from tp_zoo.checkpoint.peft import save_peft_adapter
from tp_zoo.errors import CheckpointMismatchError
from tp_zoo.errors import CheckpointNotFoundError
from tp_zoo.errors import CorruptCheckpointError
from tp_zoo.errors import UnsupportedConfigError
from tp_zoo.layers.base import get_weights
from tp_zoo.layers.base import set_weights

LLAMA = "llama_9_heads_gqa3"
LLAMA_TARGETS = ["query", "key", "value", "output", "gate", "up", "down"]
LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The adapter peft makes: every projection (query and key/value heads are
# padded at tp 2 and 4), lora_alpha != r (a scale other than tp_zoo's 1).
PEFT_LLAMA = dict(r=8, lora_alpha=16, target_modules=LLAMA_MODULES)
# float32: the same math in another order (tp_zoo adds A @ B to the kernel,
# PEFT runs B(A x) beside it) differs by float32 rounding, ~1e-6 of the logits.
FLOAT32_REL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(case, dtype) -> the directory of a tiny transformers checkpoint (made once)."""
    made = {}

    def make(case, dtype="float32"):
        if (case, dtype) not in made:
            model = ckpts.build_model(ckpts.CASES[case]).to(getattr(torch, dtype))
            made[case, dtype] = tmp_path_factory.mktemp(f"{case}_{dtype}")
            ckpts.save(model, made[case, dtype])
        return made[case, dtype]

    return make


def _inputs(path):
    """(ids, mask) of the shared right-padded batch, for the checkpoint's vocab."""
    return ckpts.batch(json.loads((path / "config.json").read_text())["vocab_size"])


def _hf(path, dtype="float32"):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()


def _peft_logits(path, adapter, dtype="float32"):
    """The logits of `peft.PeftModel.from_pretrained(transformers model, adapter)`."""
    return ckpts.reference_logits(peft.PeftModel.from_pretrained(_hf(path, dtype), adapter).eval(), *_inputs(path))


def _logits(lm, path):
    ids, mask = _inputs(path)
    return np.asarray(lm({"token_ids": ids, "padding_mask": mask})).astype("float32")


def _assert_logits_close(reference, got, path, what):
    """Within FLOAT32_REL, at the real positions of the right-padded batch
    (what a model computes at padding is not defined: OPT's positions there
    differ from transformers', adapter or not)."""
    real = _inputs(path)[1].astype(bool)
    assert_close(reference[real], got[real], what, rel=FLOAT32_REL)


def _adapters(lm):
    return [v for v in lm.weights if "lora_kernel" in v.path]


def _randomize(lm, seed=1):
    """Every adapter (B included) ~ 0.3 N(0, 1), at true shapes."""
    rs = np.random.RandomState(seed)
    set_weights(_adapters(lm), [0.3 * rs.randn(*w.shape).astype("float32") for w in get_weights(_adapters(lm))])


def _make_peft_adapter(path, directory, dtype="float32", std=0.3, **lora):
    """An adapter made by peft on the transformers model, every LoRA weight
    ~ std N(0, 1) (B too: peft starts it at zero), saved by peft; returns
    the PeftModel's logits."""
    model = peft.get_peft_model(_hf(path, dtype), peft.LoraConfig(lora_dropout=0.0, **lora)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    model.save_pretrained(directory)
    return ckpts.reference_logits(model, *_inputs(path))


@pytest.fixture(scope="module")
def llama_adapter(checkpoint, tmp_path_factory):
    """(directory, PeftModel logits) of PEFT_LLAMA made by peft on the float32 Llama."""
    directory = tmp_path_factory.mktemp("llama_adapter")
    return directory, _make_peft_adapter(checkpoint(LLAMA), directory, **PEFT_LLAMA)


def _assert_padding_zero(lm):
    """The adapters of padded projections (query and key/value B, output A)
    hold zeros at their padding."""
    padded = [v for v in _adapters(lm) if is_padded(v)]
    assert {v.path.split("/", 1)[1] for v in padded} == {
        "attention/qkv/query_lora_kernel_b", "attention/qkv/key_lora_kernel_b", "attention/qkv/value_lora_kernel_b",
        "attention/output/lora_kernel_a",
    }
    assert not any(np.any(padded_entries(v)) for v in padded)


@pytest.mark.parametrize("tp", [1, 2])
def test_peft_adapter_gives_peft_logits(checkpoint, llama_adapter, tp):
    path = checkpoint(LLAMA)
    directory, reference = llama_adapter
    lm = tp_zoo.from_preset(path, tp=tp, dtype="float32", progress=False, adapter=directory)
    assert len(_adapters(lm)) == 2 * 2 * len(LLAMA_TARGETS)  # 2 layers, A and B
    if tp == 2:
        _assert_padding_zero(lm)
    _assert_logits_close(reference, _logits(lm, path), path, f"tp_zoo (tp={tp}) with peft's adapter")


def test_llama_adapter_both_ways_at_tp4(checkpoint, llama_adapter, tmp_path):
    """tp=4 (9/3 heads padded to 12/4): peft's adapter gives the PeftModel's
    logits; then its adapters are set to random values (B nonzero, at true
    shapes), and the saved adapter gives tp_zoo's logits in a PeftModel."""
    path = checkpoint(LLAMA)
    directory, reference = llama_adapter
    lm = tp_zoo.from_preset(path, tp=4, dtype="float32", progress=False, adapter=directory)
    _assert_padding_zero(lm)
    _assert_logits_close(reference, _logits(lm, path), path, "tp_zoo (tp=4) with peft's adapter")
    _randomize(lm)
    save_peft_adapter(lm, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(LLAMA_MODULES)
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (8, 8, str(path))
    tensors = safetensors.numpy.load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    shapes = {k.split(".", 6)[-1]: v.shape for k, v in tensors.items() if ".layers.1." in k}
    assert (shapes["q_proj.lora_A.weight"], shapes["q_proj.lora_B.weight"]) == ((8, 36), (36, 8))
    assert (shapes["k_proj.lora_B.weight"], shapes["o_proj.lora_A.weight"]) == ((12, 8), (8, 36))
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].dtype == np.float32
    _assert_logits_close(_peft_logits(path, tmp_path / "adapter"), _logits(lm, path), path,
                         "PeftModel on tp_zoo's adapter")


def test_opt_adapter_both_ways(checkpoint, tmp_path):
    """OPT-350m style (project_in/out) at tp=2: an adapter of every Linear
    (use_rslora: PEFT's scale alpha / sqrt(r), folded into B) from peft
    into tp_zoo, and back out."""
    path = checkpoint("opt_post_ln_proj")
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "project_in", "project_out"]
    reference = _make_peft_adapter(path, tmp_path / "peft", r=4, lora_alpha=6, use_rslora=True,
                                   target_modules=targets)
    lm = tp_zoo.from_preset(path, tp=2, dtype="float32", progress=False, adapter=tmp_path / "peft")
    _assert_logits_close(reference, _logits(lm, path), path, "tp_zoo with peft's OPT adapter")
    save_peft_adapter(lm, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["target_modules"] == sorted(targets)
    _assert_logits_close(reference, _peft_logits(path, tmp_path / "ours"), path, "PeftModel on tp_zoo's OPT adapter")


def test_bfloat16_adapter_both_ways(checkpoint, tmp_path):
    """A bfloat16 checkpoint (as users' are) at tp=2: peft's adapter (float32:
    peft keeps adapters in float32 over a bf16 model) into tp_zoo, and back
    out. bf16 logits of two implementations differ by bf16 rounding: each is
    compared with the float32 PeftModel (on the same bf16 weights), and must
    be about as close to it as the bf16 PeftModel is (within 1.5x: tiny
    models' errors vary more than test_bf16_fidelity's wide ones). The
    adapter's update is smaller than the weights, as a trained one's is:
    tp_zoo adds it to the bf16 kernel and rounds the sum, where PEFT runs it
    beside the kernel in float32, so an update as large as the weights (std
    0.3 on every module) costs tp_zoo 1.8x PEFT's error. The adapter's effect on the
    logits must be far larger than that error."""
    path = checkpoint(LLAMA, "bfloat16")
    theirs = _make_peft_adapter(path, tmp_path / "peft", dtype="bfloat16", std=0.05, **PEFT_LLAMA)
    reference = _peft_logits(path, tmp_path / "peft", "float32")  # the bf16 weights, exact in float32
    lm = tp_zoo.from_preset(path, tp=2, progress=False, adapter=tmp_path / "peft")
    ours = _logits(lm, path)
    save_peft_adapter(lm, tmp_path / "ours")
    again = _peft_logits(path, tmp_path / "ours", "bfloat16")
    real = _inputs(path)[1].astype(bool)
    error = lambda logits: float(np.abs(logits - reference)[real].mean())
    effect = float(np.abs(ckpts.reference_logits(_hf(path, "float32"), *_inputs(path)) - reference)[real].mean())
    print(f"\nbf16 mean |logit - float32 PeftModel|: tp_zoo {error(ours):.4f}, PeftModel {error(theirs):.4f}, "
          f"PeftModel on tp_zoo's saved adapter {error(again):.4f}; the adapter's effect {effect:.4f}")
    assert error(ours) <= 1.5 * error(theirs) and error(again) <= 1.5 * error(theirs)
    assert effect > 20 * error(theirs)


# --- bad input ------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_llama(checkpoint):
    """A tp=1 Llama without LoRA, which every refused adapter must leave so."""
    return tp_zoo.from_preset(checkpoint(LLAMA), tp=1, dtype="float32", progress=False)


def _altered(adapter, directory, config=None, tensors=None, remove=()):
    """A copy of the adapter in `directory`, its config updated with `config`
    and its tensors mapped by `tensors` (dict -> dict), files in `remove` deleted."""
    shutil.copytree(adapter, directory)
    if config:
        path = directory / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors:
        path = directory / "adapter_model.safetensors"
        safetensors.numpy.save_file(tensors(safetensors.numpy.load_file(path)), path)
    for name in remove:
        (directory / name).unlink()
    return directory


def _with_lm_head(tensors):
    return {**tensors, "base_model.model.lm_head.lora_A.weight": np.zeros((8, 36), "float32"),
            "base_model.model.lm_head.lora_B.weight": np.zeros((100, 8), "float32")}


def _narrower(tensors):  # an adapter of a model 32 wide, not 36
    return {k: v[:, :32] if ".lora_A." in k else v[:32] for k, v in tensors.items()}


BAD = {
    "no config": (dict(remove=["adapter_config.json"]), CheckpointNotFoundError, "has no adapter_config.json"),
    "no weights": (dict(remove=["adapter_model.safetensors"]), CheckpointNotFoundError,
                   "no adapter_model.safetensors: the adapter's weights are missing"),
    "not LoRA": (dict(config={"peft_type": "IA3"}), UnsupportedConfigError, "PEFT 'IA3' adapter: tp_zoo loads LoRA"),
    "DoRA": (dict(config={"use_dora": True}), UnsupportedConfigError, "sets use_dora=True"),
    "bias": (dict(config={"bias": "lora_only"}), UnsupportedConfigError, "sets bias='lora_only'"),
    "modules_to_save": (dict(config={"modules_to_save": ["lm_head"]}), UnsupportedConfigError,
                        r"sets modules_to_save=\['lm_head'\]"),
    "rank_pattern": (dict(config={"rank_pattern": {"q_proj": 4}}), UnsupportedConfigError, "sets rank_pattern="),
    "alpha_pattern": (dict(config={"alpha_pattern": {"q_proj": 4}}), UnsupportedConfigError, "sets alpha_pattern="),
    "unmappable module": (dict(tensors=_with_lm_head), UnsupportedConfigError,
                          r"modules tp_zoo cannot map: lm_head; this llama model's LoRA targets are "
                          r"down_proj \(down\), gate_proj \(gate\), k_proj \(key\), .* v_proj \(value\)\.$"),
    "half an adapter": (dict(tensors=lambda t: {k: v for k, v in t.items() if "1.mlp.down_proj.lora_B" not in k}),
                        CorruptCheckpointError, r"lacks model.layers.1.mlp.down_proj.lora_B.weight\."),
    "other base model": (dict(tensors=_narrower), CheckpointMismatchError,
                         r"lora_A/lora_B of model.layers.0.mlp.down_proj are \(8, 32\)/\(32, 8\); at r=8 this "
                         r"model's \(64 in, 36 out features\) are \(8, 64\)/\(36, 8\): the adapter was made for "
                         "another base model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_refused_model_unchanged(plain_llama, llama_adapter, tmp_path, case):
    changes, error, message = BAD[case]
    directory = _altered(llama_adapter[0], tmp_path / "adapter", **changes)
    count = len(plain_llama.weights)
    with pytest.raises(error, match=message) as raised:
        load_peft_adapter(plain_llama, directory)
    assert "\n" not in str(raised.value)
    assert len(plain_llama.weights) == count and not _adapters(plain_llama)
    assert all(v.trainable for v in plain_llama.weights)  # enable_lora would have frozen them


def test_pickled_adapter_refused(plain_llama, llama_adapter, tmp_path):
    directory = _altered(llama_adapter[0], tmp_path / "adapter", remove=["adapter_model.safetensors"])
    (directory / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointNotFoundError, match="only the pickled adapter_model.bin: save it with "
                                                      "safe_serialization=True"):
        load_peft_adapter(plain_llama, directory)


def test_from_preset_checks_the_adapter_before_the_model(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="has no adapter_config.json"):
        tp_zoo.from_preset(tmp_path / "no_checkpoint_either", adapter=tmp_path)


def test_onto_lora_already_enabled(checkpoint, llama_adapter, tmp_path):
    """LoRA enabled at rank 8 on all but down: an adapter of down too is
    refused, and one of rank 4, the adapters unchanged; one of fewer modules
    (no gate, no down) loads, the model's gate adapters zeroed."""
    path = checkpoint(LLAMA)
    lm = tp_zoo.from_preset(path, tp=1, dtype="float32", progress=False)
    lm.backbone.enable_lora(8, target_layer_names=LLAMA_TARGETS[:-1])
    _randomize(lm)
    before = get_weights(_adapters(lm))
    with pytest.raises(CheckpointMismatchError, match=r"adapts down, which this model has no LoRA on \(enabled on "
                                                      r"gate, key, output, query, up, value\)"):
        load_peft_adapter(lm, llama_adapter[0])
    rank4 = _altered(llama_adapter[0], tmp_path / "rank4", config={"r": 4},
                     tensors=lambda t: {k: v[:4] if ".lora_A." in k else v[:, :4] for k, v in t.items()})
    with pytest.raises(CheckpointMismatchError, match="adapters of rank 4; this model has LoRA enabled at rank 8"):
        load_peft_adapter(lm, rank4)
    for old, new in zip(before, get_weights(_adapters(lm))):
        np.testing.assert_array_equal(old, new)
    fewer_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
    fewer = _altered(llama_adapter[0], tmp_path / "fewer", config={"target_modules": fewer_modules},
                     tensors=lambda t: {k: v for k, v in t.items() if "gate_proj" not in k and "down_proj" not in k})
    load_peft_adapter(lm, fewer)
    _assert_logits_close(_peft_logits(path, fewer), _logits(lm, path), path, "tp_zoo with an adapter of fewer modules")


def test_other_base_model_name_warns_and_loads(checkpoint, llama_adapter, tmp_path):
    directory = _altered(llama_adapter[0], tmp_path / "adapter",
                         config={"base_model_name_or_path": "someone/another-model"})
    lm = tp_zoo.from_preset(checkpoint(LLAMA), tp=1, dtype="float32", progress=False)
    with pytest.warns(UserWarning, match="made for someone/another-model; this model was loaded from "):
        load_peft_adapter(lm, directory)
    _assert_logits_close(llama_adapter[1], _logits(lm, checkpoint(LLAMA)), checkpoint(LLAMA), "logits")


def test_gpt2_refused_both_ways(checkpoint, llama_adapter, tmp_path):
    lm = tp_zoo.from_preset(checkpoint("gpt2"), tp=1, dtype="float32", progress=False)
    message = (r"gpt2: tp_zoo maps PEFT adapters of torch Linear modules only \(.*\), and transformer_layer_0/.* "
               r"is transformer\.h\.0\..*, not the weight of a Linear of its own\.$")
    with pytest.raises(UnsupportedConfigError, match=message):
        load_peft_adapter(lm, llama_adapter[0])
    assert not _adapters(lm)
    lm.backbone.enable_lora(4)
    with pytest.raises(UnsupportedConfigError, match=message):
        save_peft_adapter(lm, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_save_without_lora_refused(plain_llama, tmp_path):
    with pytest.raises(ValueError, match=r"no LoRA adapters: call backbone.enable_lora\(rank\) first"):
        save_peft_adapter(plain_llama, tmp_path)


def test_interrupted_save_leaves_nothing_complete(checkpoint, tmp_path, monkeypatch):
    """Over an older adapter: its config goes first, the new one comes last."""
    lm = tp_zoo.from_preset(checkpoint(LLAMA), tp=1, dtype="float32", progress=False)
    lm.backbone.enable_lora(2)
    save_peft_adapter(lm, tmp_path)
    calls, true_value = [], tp_peft.true_value

    def failing(variable):  # the disk fills after 3 adapters
        calls.append(variable)
        if len(calls) > 3:
            raise OSError("disk full")
        return true_value(variable)

    monkeypatch.setattr(tp_peft, "true_value", failing)
    with pytest.raises(OSError, match="disk full"):
        save_peft_adapter(lm, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors"]  # the old one, untouched
