"""Weight-only int8: per-output-channel absmax quantization of kernels.

A kernel of shape (*in_dims, *out_dims) becomes int8 values stored
output-major, of shape (*out_dims, *in_dims): each output channel's
weights contiguous along the reduction, the order the GPU product kernel
reads (`tp_zoo.kernels.int8_matmul`). The values' layout and padding are
the kernel's, permuted the same way; get_weights/set_weights and export
show them in the kernel's order. The float32 scale has shape out_dims,
split like the kernel's output dims. The scale is the max |w| over the
whole reduction (input) dims / 127, computed on the global array (XLA adds
the collective where the reduction dim is split), so the int8 values and
scales are the same at every tp. The layer computes x @ int8 values in
float32 (`int8_product`), times the scale (after the all-reduce of a
row-parallel layer: the scale is per output channel, the same on every
device), plus the bias.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from tp_zoo.kernels import int8_matmul
from tp_zoo.layers.precision import product_precision
from tp_zoo.layers.quantize.scheme import FromKernel
from tp_zoo.layers.quantize.scheme import QuantizationScheme
from tp_zoo.layers.storage import output_major
from tp_zoo.layers.storage import output_major_parts
from tp_zoo.layers.storage import to_output_major


def scale_from_absmax(amax):
    """max |w| per channel -> its scale (1 where a channel is all zeros).
    One definition, so that quantizing while loading rounds the same way."""
    return jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)


def int8_values(w, scale):
    """round(w / scale) clipped to [-127, 127], as int8 (w in float32, in
    the kernel's order)."""
    return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)


@functools.partial(jax.jit, static_argnums=1)
def quantize_int8(kernel, n_in):
    """(int8 values, float32 scale) of `kernel`, reducing over its first
    `n_in` dims: scale = max |w| / 127 (1 where a channel is all zeros),
    values = round(w / scale) clipped to [-127, 127], output-major."""
    w = kernel.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=tuple(range(n_in)))
    scale = scale_from_absmax(amax)
    return to_output_major(int8_values(w, scale), n_in), scale


def dequantize(values, scale, dtype=jnp.float32):
    """values * scale in `dtype`, in the values' (output-major) order: the
    scale broadcast on their leading (output) dims."""
    scale = scale.reshape(scale.shape + (1,) * (values.ndim - scale.ndim))
    return (values.astype(jnp.float32) * scale).astype(dtype)


def int8_product(x, values, n_in):
    """x @ kernel in float32, unscaled, for the kernel's output-major int8
    `values` (*out_dims, *in_dims): x's trailing `n_in` dims against the
    values' trailing `n_in` dims. A few rows on a GPU (decode) go through
    the Pallas kernel, which reads each int8 byte once; otherwise XLA, the
    values converted to x's dtype (exact) and accumulated in float32."""
    out_dims = values.shape[: values.ndim - n_in]
    lead = x.shape[: x.ndim - n_in]
    x2 = x.reshape(-1, math.prod(x.shape[x.ndim - n_in :]))
    w2 = values.reshape(math.prod(out_dims), x2.shape[1])  # (N, K), as stored: no copy
    if int8_matmul.applies(x2, w2):
        y = int8_matmul.int8_matmul(x2, w2)
    else:
        y = jnp.einsum(
            "rk,nk->rn", x2, w2.astype(x.dtype), precision=product_precision(x2), preferred_element_type=jnp.float32
        )
    return y.reshape(lead + out_dims)


_scale_from_absmax = jax.jit(scale_from_absmax)


@jax.jit
def _quantize_block(block, scale):
    """An output-major float block's int8 values, `scale` that of its leading (output) dims."""
    scale = scale.reshape(scale.shape + (1,) * (block.ndim - scale.ndim))
    return int8_values(block.astype(jnp.float32), scale)


class Int8Scheme(QuantizationScheme):
    """A float32 `kernel_scale` per output channel (made first), then the
    int8 `kernel` values, output-major; both frozen."""

    mode = "int8"
    description = "weight-only, per-output-channel scales"

    def create_weights(self, layer, spec, values=None):
        n = spec.n_in
        scale, int8 = ("ones", "zeros") if values is None else (values["kernel_scale"], values["kernel"])
        out_padding = spec.padding[n:]
        kernel_scale = layer.add_sharded_weight(
            "kernel_scale", spec.shape[n:], spec.layout[n:], scale, trainable=False, dtype="float32",
            padding=out_padding, parts=spec.out_parts,
            from_kernel=FromKernel(self, "statistic", out_padding, spec.out_parts),
        )
        kernel = layer.add_sharded_weight(
            "kernel", output_major(spec.shape, n), output_major(spec.layout, n), int8, trainable=False,
            dtype="int8", padding=output_major(spec.padding, n), parts=output_major_parts(spec.parts, n),
            inputs_last=n, from_kernel=FromKernel(self, "values", inputs_last=n),
        )
        return {"kernel_scale": kernel_scale, "kernel": kernel}

    def quantize(self, kernel, n_in, dtype):
        values, scale = quantize_int8(kernel, n_in)
        return {"kernel_scale": scale, "kernel": values}

    def product(self, x, weights, equation, n_in):
        # int8 values (exact in bf16) times x, accumulated in float32.
        return int8_product(x, weights.kernel, n_in)

    def rescale(self, y, weights):
        return y * weights.scale.astype(jnp.float32)

    def dequantize(self, weights, dtype=jnp.float32):
        return dequantize(weights.kernel, weights.scale, dtype)

    def cut_outputs(self, weights, n_in, out_dim, cut):
        # Output-major values: the output dims lead, as in the scale.
        return weights._replace(kernel=cut(weights.kernel, out_dim), scale=cut(weights.scale, out_dim))

    def statistic(self, amax):
        # Padded output channels (vocab, heads, MLP units) get scale 1: they are zeros.
        return np.asarray(_scale_from_absmax(amax))

    def quantize_block(self, block, statistic, box):
        block_scale = statistic[tuple(slice(a, b) for a, b in box[: statistic.ndim])]
        return _quantize_block(block, jax.device_put(block_scale, block.devices().pop()))

    def stored_bytes(self, entries, outputs, itemsize):
        return entries + 4 * outputs  # int8 values, a float32 scale per output channel

    def product_copy_bytes(self, kernel_shape, itemsize):
        # Multiplied as a compute-dtype copy (XLA's product; the GPU decode kernel reads int8).
        return itemsize * math.prod(kernel_shape)
