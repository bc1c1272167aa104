"""LoRA on sharded layers: adapters split with their kernels, equal to tp=1;
with heads padded for tp, equal to a tp that pads nothing, the padding of
every adapter exactly zero."""

import keras
import numpy as np
import pytest
import torch
import transformers

import tp_zoo
from tests.helpers import assert_close
from tests.helpers import is_padded
from tests.helpers import padded_entries
from tests.models import checkpoints as ckpts
from tp_zoo.checkpoint.export import export_to_hf
from tp_zoo.layers.base import get_weights
from tp_zoo.layers.base import set_weights

TARGETS = ["query", "value", "output", "down"]  # column- and row-parallel kernels


def _batch():
    ids = np.random.RandomState(0).randint(0, 100, (4, 13)).astype("int32")
    return {"token_ids": ids[:, :-1], "padding_mask": np.ones((4, 12), "int32")}, ids[:, 1:]


def _lora_train(path, tp, steps=3, adapters=None):
    """`adapters`: starting values of the adapters (true shapes; default: the initializers')."""
    lm = tp_zoo.from_preset(path, tp=tp, dtype="float32", progress=False)
    keras.utils.set_random_seed(0)
    lm.backbone.enable_lora(4, target_layer_names=TARGETS)
    if adapters is not None:
        set_weights(_adapters(lm), adapters)
    lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-2), weighted_metrics=[])
    frozen = {v.path: np.asarray(v.numpy()) for v in lm.weights if "lora" not in v.path}
    x, y = _batch()
    losses = [float(lm.train_on_batch(x, y)) for _ in range(steps)]
    return lm, losses, frozen


def _adapters(lm):
    return [v for v in lm.weights if "lora_kernel" in v.path]


@pytest.fixture(scope="module")
def reference(llama_path):
    return _lora_train(llama_path, 1)


def test_only_adapters_train_and_tp2_equals_tp1(llama_path, reference):
    ref_lm, ref_losses, _ = reference
    lm, losses, frozen = _lora_train(llama_path, 2)
    assert {v.path.rsplit("/", 1)[1] for v in lm.trainable_variables} == {  # query and value: parts of qkv
        "lora_kernel_a", "lora_kernel_b", "query_lora_kernel_a", "query_lora_kernel_b",
        "value_lora_kernel_a", "value_lora_kernel_b",
    }
    assert len(lm.trainable_variables) == 2 * len(TARGETS) * 2  # 2 layers
    for v in lm.weights:
        if "lora" not in v.path:
            np.testing.assert_array_equal(np.asarray(v.numpy()), frozen[v.path], err_msg=v.path)
    diff = max(assert_close(r, g, "LoRA loss") for r, g in zip(ref_losses, losses))
    ref_adapters = {v.path: v.numpy() for v in ref_lm.trainable_variables}
    diff = max([diff] + [assert_close(ref_adapters[v.path], v.numpy(), v.path) for v in lm.trainable_variables])
    assert losses[-1] < losses[0]
    print(f"\nLoRA tp=2 vs tp=1 after 3 steps: max |diff| {diff:.2e}")


def test_adapters_split_with_their_kernel(llama_path):
    lm = tp_zoo.from_preset(llama_path, tp=2, dtype="float32", progress=False)
    lm.backbone.enable_lora(4, target_layer_names=TARGETS)
    layer = lm.backbone.transformer_layers[0]
    shards = lambda v: v.value.addressable_shards[0].data.shape
    qkv, down = layer.attention.qkv, layer.mlp.down
    assert [name for name, _ in qkv.lora_variables()] == [  # the query and value parts of the fused kernel
        "value_lora_kernel_a", "value_lora_kernel_b", "query_lora_kernel_a", "query_lora_kernel_b"
    ]
    assert shards(qkv.query_lora_kernel_a) == (32, 4) and shards(qkv.query_lora_kernel_b) == (4, 4, 8)  # B split on heads
    assert qkv.query_lora_kernel_b.shape == (4, 8, 8) and qkv.value_lora_kernel_b.shape == (4, 2, 8)
    assert shards(down.lora_kernel_a) == (32, 4) and shards(down.lora_kernel_b) == (4, 32)  # A split on inputs
    assert down.lora_kernel_a.shape == (64, 4)


def test_save_adapters_alone_load_at_another_tp_and_merge(llama_path, reference, tmp_path):
    ref_lm, _, _ = reference
    path = str(tmp_path / "adapters.lora.h5")
    ref_lm.backbone.save_lora_weights(path)
    x, _ = _batch()
    expected = np.asarray(ref_lm(x))
    lm = tp_zoo.from_preset(llama_path, tp=4, dtype="float32", progress=False)
    lm.backbone.enable_lora(4, target_layer_names=TARGETS)
    lm.backbone.load_lora_weights(path)
    assert_close(expected, np.asarray(lm(x)), "logits with loaded adapters")
    with pytest.raises(ValueError, match="not merged"):
        export_to_hf(lm, tmp_path / "unmerged")
    lm.backbone.merge_lora()
    assert_close(expected, np.asarray(lm(x)), "logits after merging")
    out = export_to_hf(lm, tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(x["token_ids"]).long()).logits.numpy()
    assert_close(ref, expected, "transformers on the merged export", rel=1e-4)


@pytest.mark.parametrize("rank", [0, -1, 2.5])
def test_bad_rank(llama_path, rank):
    lm = tp_zoo.from_preset(llama_path, tp=1, dtype="float32", progress=False)
    with pytest.raises(ValueError, match="LoRA rank must be a positive integer"):
        lm.backbone.enable_lora(rank)


def test_padded_heads_lora_equals_a_tp_that_divides(tmp_path):
    """Qwen2 14/2 heads at tp=4 (16 heads: the output projection's A has
    padded rows) against tp=2, from the same adapters: same losses and
    adapters after 3 steps, the adapters' padding exactly zero; the saved
    adapters load at tp=2, and the merged export computes in transformers
    what the model does."""
    ckpts.save(ckpts.build_model(ckpts.CASES["qwen2_14_heads_gqa2"]), tmp_path / "hf")
    ref_lm, ref_losses, _ = _lora_train(tmp_path / "hf", 2, steps=0)
    start = get_weights(_adapters(ref_lm))
    ref_lm, ref_losses, _ = _lora_train(tmp_path / "hf", 2, adapters=start)
    lm, losses, _ = _lora_train(tmp_path / "hf", 4, adapters=start)
    padded = [v for v in _adapters(lm) if is_padded(v)]
    assert {tuple(v.path.split("/")[-2:]) for v in padded} == {("qkv", "query_lora_kernel_b"), ("output", "lora_kernel_a")}
    for v in padded:
        assert not np.any(padded_entries(v)), v.path
    diff = max(assert_close(r, g, "LoRA loss") for r, g in zip(ref_losses, losses))
    for r, g, v in zip(get_weights(_adapters(ref_lm)), get_weights(_adapters(lm)), _adapters(lm)):
        diff = max(diff, assert_close(r, g, v.path))
    assert losses[-1] < losses[0]
    x, _ = _batch()
    expected = np.asarray(lm(x))
    lm.backbone.save_lora_weights(str(tmp_path / "padded.lora.h5"))  # true shapes: loads at tp=2
    unpadded = tp_zoo.from_preset(tmp_path / "hf", tp=2, dtype="float32", progress=False)
    unpadded.backbone.enable_lora(4, target_layer_names=TARGETS)
    unpadded.backbone.load_lora_weights(str(tmp_path / "padded.lora.h5"))
    assert_close(expected, np.asarray(unpadded(x)), "adapters saved at tp=4 (padded), loaded at tp=2")
    lm.backbone.merge_lora()
    out = export_to_hf(lm, tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(x["token_ids"]).long()).logits.numpy()
    export_diff = assert_close(ref, expected, "transformers on the merged export", rel=1e-4)
    print(f"\nLoRA, 14/2 heads: tp=4 (padded) vs tp=2 max |diff| {diff:.2e}; merged export vs transformers {export_diff:.2e}")
