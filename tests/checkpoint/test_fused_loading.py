"""The loader writes each part of a fused variable (q/k/v, gate/up) from its
own checkpoint tensor straight into its place in every device's block.

Checked against blocks built here from the checkpoint itself, device by
device and bitwise, zeros at the padding: Qwen2's 14 query heads over 2 kv
heads, split with the kv heads at tp=2, padded to 16 heads with the kv
heads whole on every device at tp 4 and 8, MLP units padded at tp=8; in
chunks of a few rows, so that chunks end inside a part and inside a head.

int8 values are read into output-major blocks the same way (a torch
Linear weight's rows untransposed, GPT-2's Conv1D rows transposed) and
quantized there: bitwise what quantizing the float model makes.
"""

import numpy as np
import pytest
import safetensors.numpy

import tp_zoo
from tests.models import checkpoints as ckpts
from tp_zoo.checkpoint import loader

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, UNITS = 14, 2, 4, 56, 100
GROUP = HEADS // KV_HEADS


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    ckpts.save(ckpts.build_model(ckpts.CASES["qwen2_14_heads_gqa2"]), path)
    return path, safetensors.numpy.load_file(path / "model.safetensors")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    ckpts.save(ckpts.build_model(ckpts.CASES["gpt2_25_heads_ffn_100"]), path)
    return path, safetensors.numpy.load_file(path / "model.safetensors")


def _qkv(q, k, v, out_shape):
    """The q/k/v variable (..., kv heads, 2 + group, head_dim) of `out_shape`
    from the (..., heads, head_dim) query and (..., kv heads, head_dim) key
    and value: each kv head's key, value and query group, zeros after."""
    fused = np.zeros(q.shape[:-2] + out_shape, q.dtype)
    for g in range(KV_HEADS):
        fused[..., g, 0, :] = k[..., g, :]
        fused[..., g, 1, :] = v[..., g, :]
        fused[..., g, 2 : 2 + GROUP, :] = q[..., g * GROUP : (g + 1) * GROUP, :]
    return fused


def _expected(tensors, layer, variables):
    """Each fused variable of `layer` as the checkpoint says it is."""
    p = f"model.layers.{layer}."
    qkv_shape = tuple(variables["qkv/bias"].shape)
    heads = lambda name, n: tensors[p + f"self_attn.{name}"].reshape(n, HEAD_DIM, -1).transpose(2, 0, 1)
    biases = lambda name, n: tensors[p + f"self_attn.{name}"].reshape(n, HEAD_DIM)
    gate_up = np.zeros(tuple(variables["gate_up/kernel"].shape), np.float32)
    gate_up[:, 0, :UNITS] = tensors[p + "mlp.gate_proj.weight"].T
    gate_up[:, 1, :UNITS] = tensors[p + "mlp.up_proj.weight"].T
    return {
        "qkv/kernel": _qkv(heads("q_proj.weight", HEADS), heads("k_proj.weight", KV_HEADS),
                           heads("v_proj.weight", KV_HEADS), qkv_shape),
        "qkv/bias": _qkv(biases("q_proj.bias", HEADS), biases("k_proj.bias", KV_HEADS),
                         biases("v_proj.bias", KV_HEADS), qkv_shape),
        "gate_up/kernel": gate_up,
    }


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_every_device_block_holds_each_part_at_its_place(qwen2, monkeypatch, tp):
    path, tensors = qwen2
    monkeypatch.setattr(loader, "_CHUNK_BYTES", 3 * HIDDEN * 4)  # 3 rows of a kernel: chunks end inside heads
    lm = tp_zoo.from_preset(path, tp=tp, dtype="float32", progress=False)
    for layer, block in enumerate(lm.backbone.transformer_layers):
        variables = {
            "qkv/kernel": block.attention.qkv.kernel, "qkv/bias": block.attention.qkv.bias,
            "gate_up/kernel": block.mlp.up.kernel,
        }
        for name, expected in _expected(tensors, layer, variables).items():
            value = variables[name].value
            assert value.shape == expected.shape, name
            for shard in value.addressable_shards:
                assert np.asarray(shard.data).tobytes() == expected[shard.index].tobytes(), (
                    f"layer {layer} {name} on {shard.device} at tp={tp}"
                )


@pytest.mark.parametrize(
    "checkpoint,tp", [("qwen2", 1), ("qwen2", 2), ("qwen2", 4), ("qwen2", 8), ("gpt2", 2), ("gpt2", 8)]
)
def test_int8_blocks_equal_quantizing_the_float_model(request, monkeypatch, checkpoint, tp):
    path, _ = request.getfixturevalue(checkpoint)
    monkeypatch.setattr(loader, "_CHUNK_BYTES", 3 * HIDDEN * 4)  # chunks end inside heads
    streamed = tp_zoo.from_preset(path, tp=tp, dtype="float32", quantize="int8", progress=False)
    after = tp_zoo.from_preset(path, tp=tp, dtype="float32", progress=False)
    after.quantize("int8")
    ours = {v.path: v.value for v in streamed.weights}
    int8 = [v for v in after.weights if v.dtype == "int8"]
    assert len(int8) == 4 * streamed.backbone.num_layers + (not streamed.backbone.tie_embeddings)
    for variable in int8 + [v for v in after.weights if v.path.endswith("kernel_scale")]:
        value = ours[variable.path]
        assert value.sharding.is_equivalent_to(variable.value.sharding, value.ndim), variable.path
        np.testing.assert_array_equal(np.asarray(value), np.asarray(variable.value), err_msg=variable.path)
