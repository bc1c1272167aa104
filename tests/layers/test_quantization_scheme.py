"""A quantization scheme added from outside the package: int8 with one
float32 scale per kernel (max |w| / 127 over the whole kernel, every part
of a fused one), values kept in the kernel's order. It is defined here and
registered with one entry in `SCHEMES`, and nothing else changes: the
linear layers, fused q/k/v and gate/up (heads and units padded for tp), the
LM head, the checkpoint loader (quantize= while streaming), .keras files
and the sharded product all take it through the scheme interface. Values
are checked against numpy references: the int8 values bitwise, outputs to
the float32 tolerance (1e-5 of the largest entry) at tp 1, 2 and 4."""

import warnings

import jax.numpy as jnp
import keras
import numpy as np
import pytest

import tp_zoo
from tests.helpers import assert_close
from tests.helpers import mesh_scope
from tests.models import checkpoints as ckpts
from tp_zoo import layers
from tp_zoo.layers.attention import padded_heads
from tp_zoo.layers.base import AxisPadding
from tp_zoo.layers.base import weight_views
from tp_zoo.layers.precision import product_precision
from tp_zoo.layers.quantize import SCHEMES
from tp_zoo.layers.quantize import FromKernel
from tp_zoo.layers.quantize import QuantizationScheme

TOY = "int8_per_tensor"


def _per_tensor_scale(amax):
    return np.float32(amax / np.float32(127)) if amax > 0 else np.float32(1)


class PerTensorInt8(QuantizationScheme):
    """int8 values in the kernel's order and one float32 `kernel_scale`."""

    mode = TOY
    description = "a test's per-tensor int8"

    def create_weights(self, layer, spec, values=None):
        scale, ints = ("ones", "zeros") if values is None else (values["kernel_scale"], values["kernel"])
        kernel_scale = layer.add_sharded_weight(
            "kernel_scale", (), (), scale, trainable=False, dtype="float32",
            from_kernel=FromKernel(self, "statistic", spec.padding[spec.n_in :], spec.out_parts),
        )
        kernel = layer.add_sharded_weight(
            "kernel", spec.shape, spec.layout, ints, trainable=False, dtype="int8", padding=spec.padding,
            parts=spec.parts, from_kernel=FromKernel(self, "values"),
        )
        return {"kernel_scale": kernel_scale, "kernel": kernel}

    def quantize(self, kernel, n_in, dtype):
        w = kernel.astype(jnp.float32)
        amax = jnp.max(jnp.abs(w))
        scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
        return {"kernel_scale": scale, "kernel": self._ints(w, scale)}

    @staticmethod
    def _ints(w, scale):
        return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)

    def product(self, x, weights, equation, n_in):
        kernel = weights.kernel.astype(x.dtype)
        return jnp.einsum(equation, x, kernel, precision=product_precision(x), preferred_element_type=jnp.float32)

    def rescale(self, y, weights):
        return y * weights.scale

    def dequantize(self, weights, dtype=jnp.float32):
        return (weights.kernel.astype(jnp.float32) * weights.scale).astype(dtype)

    def cut_outputs(self, weights, n_in, out_dim, cut):
        return weights._replace(kernel=cut(weights.kernel, n_in + out_dim))

    def statistic(self, amax):
        return np.asarray(_per_tensor_scale(amax.max()))

    def quantize_block(self, block, statistic, box):
        return self._ints(block.astype(jnp.float32), statistic)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(SCHEMES, TOY, PerTensorInt8())  # the one line that registers a scheme


def _reference_ints(views):
    """(int8 values of each true-shape kernel view, the scale), in numpy."""
    scale = _per_tensor_scale(max(np.abs(v).max() for v in views))
    return [np.clip(np.round(v / scale), -127, 127).astype(np.int8) for v in views], scale


def _qkv(num_heads, num_kv_heads, tp):
    kv, group = padded_heads(num_heads, num_kv_heads, tp)
    padding = AxisPadding(num_kv_heads, kv, num_heads // num_kv_heads, group)
    return layers.QKVParallelDense(4, padding, replicated=kv % tp != 0)


# (make layer, input shape): heads and units padded at tp 4 for the fused ones.
LAYERS = {
    "column": (lambda tp: layers.ColumnParallelDense(16), (2, 3, 8)),
    "row": (lambda tp: layers.RowParallelDense(8), (2, 3, 16)),
    "head_merge": (lambda tp: layers.HeadMergeDense(8), (2, 3, 4, 6)),
    "gate_up": (lambda tp: layers.MergedColumnParallelDense(
        30, padding=AxisPadding.trailing(30, -(-30 // tp) * tp)), (2, 3, 8)),
    "qkv": (lambda tp: _qkv(6, 2, tp), (2, 3, 8)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_toy_scheme_in_every_linear_layer_at_every_tp(toy, name):
    """The layer quantized by the toy scheme computes x @ (values * scale) +
    bias of its own (padded) float kernel, in numpy float64; the values
    (true shapes) and the scale are the same at every tp."""
    make, in_shape = LAYERS[name]
    rs = np.random.RandomState(0)
    x = rs.standard_normal(in_shape).astype("float32")
    first = None
    for tp in (1, 2, 4):
        with mesh_scope(tp), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # padding notes
            layer = make(tp)
            layer.build(in_shape)
        if first is None:
            first = [rs.standard_normal(w.shape).astype("float32") for w in layer.get_weights()]
        layer.set_weights(first)
        kernel, bias = layer.kernel.numpy(), layer.bias.numpy()  # padded, zeros at the padding
        float_views = [v for _, v in weight_views(layer.kernel)]
        layer.quantize(TOY)
        assert layer.quantized == TOY and layer.kernel.dtype == "int8" and layer.kernel_scale.shape == ()
        ints, scale = _reference_ints(float_views)
        for got, want in zip([v for _, v in weight_views(layer.kernel)], ints):
            np.testing.assert_array_equal(got, want)
        assert layer.kernel_scale.numpy() == scale
        dequantized = np.clip(np.round(kernel / scale), -127, 127).astype(np.float64) * np.float64(scale)
        expected = np.einsum(layer.equation, x.astype(np.float64), dequantized) + bias
        got = np.asarray(layer(x))
        assert_close(expected, got, f"{name} toy scheme at tp={tp}")


def _reference_model(path):
    """The float model (tp 1) with each quantizable kernel (and the LM head's)
    replaced by its toy-dequantized values, made in numpy."""
    lm = tp_zoo.from_preset(path, tp=1, dtype="float32", progress=False)
    for layer in lm.backbone.quantizable_layers() + [lm.lm_head]:
        ints, scale = _reference_ints([v for _, v in weight_views(layer.kernel)])
        values = []
        for variable in layer.weights:
            views = [v for _, v in weight_views(variable)]
            values += [i.astype(np.float32) * scale for i in ints] if variable is layer.kernel else views
        layer.set_weights(values)
    return lm


def test_toy_scheme_streamed_by_from_preset_with_padded_heads(toy, tmp_path):
    """from_preset(quantize=toy) streams what lm.quantize(toy) makes (every
    variable bitwise), at tp 1, 2 and 4 (14 query heads padded to 16 at 4),
    and computes the reference model's logits; a .keras file of it reloads
    at another tp with the same logits."""
    path = tmp_path / "qwen2"
    ckpts.save(ckpts.build_model(ckpts.CASES["qwen2_14_heads_gqa2"]), path)
    ids, mask = ckpts.batch(ckpts.CASES["qwen2_14_heads_gqa2"][2]["vocab_size"])
    x, real = {"token_ids": ids, "padding_mask": mask}, mask.astype(bool)
    reference = np.asarray(_reference_model(path)(x))
    for tp in (1, 2, 4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # padding notes
            streamed = tp_zoo.from_preset(path, tp=tp, dtype="float32", quantize=TOY, progress=False)
            after = tp_zoo.from_preset(path, tp=tp, dtype="float32", progress=False)
        after.quantize(TOY)
        assert [v.path for v in streamed.weights] == [v.path for v in after.weights]
        for mine, theirs in zip(streamed.weights, after.weights):
            assert mine.dtype == theirs.dtype, mine.path
            np.testing.assert_array_equal(mine.numpy(), theirs.numpy(), err_msg=f"{mine.path} at tp={tp}")
        toy_layers = streamed.backbone.quantizable_layers() + [streamed.lm_head]
        assert all(l.kernel.dtype == "int8" and l.kernel_scale.shape == () for l in toy_layers)
        logits = np.asarray(streamed(x))
        assert_close(reference[real], logits[real], f"toy-quantized logits at tp={tp}")
    streamed.save(tmp_path / "toy.keras")
    with mesh_scope(2):
        loaded = keras.saving.load_model(tmp_path / "toy.keras")
    assert loaded.backbone.quantized == TOY
    assert_close(logits[real], np.asarray(loaded(x))[real], ".keras of the toy scheme, saved at tp=4, loaded at tp=2")


def test_unknown_mode_names_the_registered_ones(toy):
    with pytest.raises(ValueError, match=r"supports 'int8' \(.*\), 'int8_per_tensor' \(a test's per-tensor int8\)"):
        tp_zoo.layers.ColumnParallelDense(4, quantized="int4")
