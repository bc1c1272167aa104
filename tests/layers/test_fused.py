"""Fused projections (q/k/v in one kernel, gate/up in one kernel) against
the separate layers they replace: with integer-valued operands every sum is
exact, so each part of the fused output must equal the separate layer's
output bitwise, at every tp, padded heads and widths included, with LoRA
adapters too, and int8 (the fused values output-major, each part as a
separate int8 layer's)."""

import warnings

import numpy as np
import pytest

import tp_zoo
from tests.helpers import assert_close
from tests.helpers import mesh_scope
from tests.helpers import padded_entries
from tp_zoo import layers
from tp_zoo.layers.attention import padded_heads
from tp_zoo.layers.base import AxisPadding
from tp_zoo.layers.base import padded_value
from tp_zoo.layers.base import round_up
from tp_zoo.layers.base import weight_views
from tp_zoo.layers.quantize import int8 as q8
from tp_zoo.layers.storage import to_kernel_order

M = tp_zoo.parallel.MODEL


def _ints(rs, shape, low=-2, high=2):
    return rs.randint(low, high + 1, shape).astype("float32")


def _views(layer):
    """Path -> true value of each weight the layer's variables stand for
    (a fused variable's parts at the separate layers' paths)."""
    return {path: value for v in layer.weights for path, value in weight_views(v)}


def _qkv_layer(num_heads, num_kv_heads, head_dim, tp):
    kv, group = padded_heads(num_heads, num_kv_heads, tp)
    padding = AxisPadding(num_kv_heads, kv, num_heads // num_kv_heads, group)
    return layers.QKVParallelDense(head_dim, padding, replicated=kv % tp != 0)


def _separate_qkv(num_heads, num_kv_heads, head_dim, x, rs, lora_rank=None, quantize=None):
    """Queries, keys and values of three single-device column-parallel
    layers of integer weights (quantized to `quantize` after their weights
    are taken), their units seen as (heads, head_dim); the float weights
    (true shapes, in the fused layer's get_weights order) and the LoRA
    adapters of query and value, by the names the fused layer gives them."""
    heads = {"query": num_heads, "key": num_kv_heads, "value": num_kv_heads}
    q, k, v = (layers.ColumnParallelDense(heads[name] * head_dim, name=name) for name in ("query", "key", "value"))

    def per_head(layer, a):
        return a.reshape(a.shape[:-1] + (heads[layer.name], head_dim))

    for layer in (q, k, v):
        layer(x)
        layer.set_weights([_ints(rs, w.shape) for w in layer.get_weights()])
    adapters = {}
    if lora_rank:
        for layer in (q, v):
            layer.enable_lora(lora_rank)
            for ab in "ab":
                variable = getattr(layer, f"lora_kernel_{ab}")
                variable.assign(_ints(rs, variable.shape))
                value = variable.numpy()
                adapters[f"{layer.name}_lora_kernel_{ab}"] = per_head(layer, value) if ab == "b" else value
    weights = [per_head(layer, getattr(layer, name).numpy()) for name in ("kernel", "bias") for layer in (k, v, q)]
    if quantize:
        for layer in (q, k, v):
            layer.quantize(quantize)
    return tuple(per_head(layer, np.asarray(layer(x))) for layer in (q, k, v)), weights, adapters


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,tp",
    [
        (8, 4, 1), (8, 4, 2), (8, 4, 4),
        (8, 4, 8),  # kv heads fewer than tp: the kernel whole on every device
        (9, 3, 2), (9, 3, 4),  # heads padded inside each kv group
        (14, 2, 4), (14, 2, 8),
        (6, 6, 4),  # MHA, padded to 8
    ],
)
@pytest.mark.parametrize("lora", [False, True])
def test_qkv_parts_equal_separate_projections_bitwise(num_heads, num_kv_heads, tp, lora):
    rs = np.random.RandomState(0)
    head_dim = 4
    x = _ints(rs, (3, 5, 16), -4, 4)
    (q_ref, k_ref, v_ref), weights, adapters = _separate_qkv(num_heads, num_kv_heads, head_dim, x, rs, lora and 2)
    with mesh_scope(tp), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = _qkv_layer(num_heads, num_kv_heads, head_dim, tp)
        layer(x)
        layer.set_weights(weights)
        if lora:
            layer.enable_lora(2, parts=["query", "value"])
            for name, variable in layer.lora_variables():
                variable.assign(padded_value(variable, adapters[name]))
        q, k, v = layer.split(np.asarray(layer(x)))
    padding = layer.query_padding
    np.testing.assert_array_equal(np.take(np.asarray(q), padding.positions(), axis=2), q_ref)
    np.testing.assert_array_equal(np.asarray(k)[:, :, :num_kv_heads], k_ref)
    np.testing.assert_array_equal(np.asarray(v)[:, :, :num_kv_heads], v_ref)


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,tp",
    [(8, 4, 2), (8, 4, 8), (9, 3, 4), (14, 2, 8)],  # split, kv replicated, padded groups, both
)
def test_int8_qkv_parts_equal_separate_int8_projections_bitwise(num_heads, num_kv_heads, tp):
    """The fused kernel quantized: its int8 values output-major, (kv heads,
    2 + group, head_dim, hidden), split on the kv heads (or whole, each
    device cutting out its group); each part's values and scale bitwise
    those of a separate int8 layer, padded heads zero, and its output the
    separate layer's (the products are exact, but XLA may scale and bias
    them in one rounding or two: float32 tolerance)."""
    rs = np.random.RandomState(4)
    head_dim = 4
    x = _ints(rs, (3, 5, 16), -4, 4)
    (q_ref, k_ref, v_ref), weights, _ = _separate_qkv(num_heads, num_kv_heads, head_dim, x, rs, quantize="int8")
    with mesh_scope(tp), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = _qkv_layer(num_heads, num_kv_heads, head_dim, tp)
        layer(x)
        layer.set_weights(weights)
        layer.quantize("int8")
        q, k, v = layer.split(np.asarray(layer(x)))
    kv_heads, group = layer.query_padding.padded_groups, layer.query_padding.padded_group_size
    assert tuple(layer.kernel.shape) == (kv_heads, 2 + group, head_dim, 16)
    layout = (None,) * 4 if layer.replicated else (M, None, None, None)
    assert layer.kernel.value.sharding.is_equivalent_to(tp_zoo.parallel.sharding(layer.mesh_info, layout), 4)
    assert not np.any(padded_entries(layer.kernel))
    views = _views(layer)  # each part as a separate int8 layer shows it: its values in the kernel's order
    for name, kernel in zip(("key", "value", "query"), weights):
        values, scale = q8.quantize_int8(kernel, 1)
        np.testing.assert_array_equal(views[f"{name}/kernel"], to_kernel_order(np.asarray(values), 1))
        np.testing.assert_array_equal(views[f"{name}/kernel_scale"], scale)
    assert_close(q_ref, np.take(np.asarray(q), layer.query_padding.positions(), axis=2), "int8 queries")
    assert_close(k_ref, np.asarray(k)[:, :, :num_kv_heads], "int8 keys")
    assert_close(v_ref, np.asarray(v)[:, :, :num_kv_heads], "int8 values")


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("units", [32, 30])  # 30: padded at tp 4 and 8
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_gate_up_parts_equal_separate_projections_bitwise(tp, units, quantize):
    rs = np.random.RandomState(1)
    x = _ints(rs, (3, 5, 16), -4, 4)
    gate, up = layers.ColumnParallelDense(units, name="gate"), layers.ColumnParallelDense(units, name="up")
    for layer in (gate, up):
        layer(x)
        layer.set_weights([_ints(rs, w.shape) for w in layer.get_weights()])
    weights = [gate.kernel.numpy(), up.kernel.numpy(), gate.bias.numpy(), up.bias.numpy()]
    with mesh_scope(tp):
        padding = AxisPadding.trailing(units, round_up(units, tp))
        fused = layers.MergedColumnParallelDense(units, padding=padding)
        fused(x)
        fused.set_weights(weights)
        if quantize:
            for layer in (gate, up, fused):
                layer.quantize(quantize)
        got_gate, got_up = fused.split(np.asarray(fused(x)))
    if quantize:  # output-major (parts, units, hidden), split on the units; padded units zero
        assert tuple(fused.kernel.shape) == (2, padding.size, 16)
        wanted = tp_zoo.parallel.sharding(fused.mesh_info, (None, M, None)) if tp > 1 else None
        assert wanted is None or fused.kernel.value.sharding.is_equivalent_to(wanted, 3)
        assert not np.any(padded_entries(fused.kernel))
        views = _views(fused)  # the parts as the separate int8 layers show theirs
        for path, value in {**_views(gate), **_views(up)}.items():
            np.testing.assert_array_equal(views[path], value, err_msg=path)
    for got, layer in ((got_gate, gate), (got_up, up)):
        got, ref = np.asarray(got)[..., :units], np.asarray(layer(x))
        if quantize:  # exact products, scaled and biased in one rounding or two
            assert_close(ref, got, f"int8 {layer.name}")
        else:
            np.testing.assert_array_equal(got, ref)


def test_fused_weights_show_as_the_separate_layers_variables():
    """get_weights, the parts' paths and shapes: what separate query/key/value
    layers would show, the same at every tp; set_weights takes them back."""
    rs = np.random.RandomState(2)
    x = _ints(rs, (2, 3, 16))
    seen = {}
    for tp in (1, 4):
        with mesh_scope(tp), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attention = layers.ParallelAttention(num_heads=9, num_kv_heads=3, head_dim=4, hidden_dim=16, name="attention")
            attention(x)
            views = [(path, value.shape) for v in attention.qkv.weights for path, value in weight_views(v)]
            seen[tp] = views
            weights = [_ints(rs, w.shape) for w in attention.get_weights()]
            attention.set_weights(weights)
            for got, want in zip(attention.get_weights(), weights):
                np.testing.assert_array_equal(got, want)
    assert seen[1] == seen[4]
    assert [p.split("/", 1)[1] for p, _ in seen[1]] == [
        "key/kernel", "value/kernel", "query/kernel", "key/bias", "value/bias", "query/bias"
    ]
    assert [s for _, s in seen[1]] == [(16, 3, 4), (16, 3, 4), (16, 9, 4), (3, 4), (3, 4), (9, 4)]


def test_lora_parts_are_checked():
    layer = layers.MergedColumnParallelDense(8)
    layer(np.zeros((1, 4), "float32"))
    with pytest.raises(ValueError, match=r"LoRA parts \['down'\] must be some of \['gate', 'up'\]"):
        layer.enable_lora(2, parts=["down"])
    assert not layer.lora_enabled and layer.kernel.trainable
