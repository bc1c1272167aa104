"""Weight-only int8: per-output-channel absmax quantization of kernels.

A kernel of shape (*in_dims, *out_dims) becomes int8 values stored
output-major, of shape (*out_dims, *in_dims): each output channel's
weights contiguous along the reduction, the order the GPU product kernel
reads (`int8_matmul_kernel`). The values' layout and padding are the
kernel's, permuted the same way (`output_major`); get_weights/set_weights
and export show them in the kernel's order. The float32 scale has shape
out_dims, split like the kernel's output dims. The scale is the max |w|
over the whole reduction (input) dims / 127, computed on the global array
(XLA adds the collective where the reduction dim is split), so the int8
values and scales are the same at every tp. The layer computes x @ int8
values in float32 (`int8_product`), times the scale (after the all-reduce
of a row-parallel layer: the scale is per output channel, the same on
every device), plus the bias.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tp_zoo.kernels import int8_matmul as int8_matmul_kernel
from tp_zoo.layers.precision import product_precision

SUPPORTED_MODES = ("int8",)


def check_mode(mode, what="quantize"):
    """ValueError for a mode tp_zoo does not implement, naming those it does."""
    if mode not in SUPPORTED_MODES:
        raise ValueError(
            f"{what}: unsupported quantization mode {mode!r}; tp_zoo supports "
            f"{', '.join(repr(m) for m in SUPPORTED_MODES)} (weight-only, per-output-channel scales)."
        )


def use_own_quantize(obj):
    """Drops the wrapper Keras puts around an instance's `quantize` (its
    config resolution and checks answer unknown modes with Keras' messages
    and pass a config object), so that the class's own method runs."""
    obj.__dict__.pop("quantize", None)


class QuantizedKernel(NamedTuple):
    """An int8 kernel's local shard, output-major values and their float32
    per-output-channel scale."""

    values: jax.Array
    scale: jax.Array


def scale_from_absmax(amax):
    """max |w| per channel -> its scale (1 where a channel is all zeros).
    One definition, so that quantizing while loading rounds the same way."""
    return jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)


def output_major(dims, n_in):
    """A kernel's per-dim entries (*in, *out) -- its shape, layout, paddings
    or axes -- in the order of its int8 values: (*out, *in)."""
    return tuple(dims[n_in:]) + tuple(dims[:n_in])


def kernel_order(dims, n_in):
    """Int8 values' per-dim entries (*out, *in) in the kernel's order (*in, *out)."""
    return output_major(dims, len(dims) - n_in)


def to_output_major(kernel, n_in):
    """A kernel (numpy or jax array) transposed to its values' order."""
    return kernel.transpose(output_major(range(kernel.ndim), n_in))


def to_kernel_order(values, n_in):
    """Output-major values (numpy or jax array) transposed to the kernel's order."""
    return values.transpose(kernel_order(range(values.ndim), n_in))


def output_major_parts(parts, n_in):
    """A fused kernel's `Fused` parts (None: not fused) as its output-major
    values hold them: each part output-major, the fused axis moved with it."""
    if parts is None:
        return None
    turn = lambda p: p._replace(
        shape=output_major(p.shape, n_in), padding=output_major(p.padding, n_in), layout=output_major(p.layout, n_in)
    )
    return parts._replace(axis=parts.axis - n_in, parts=tuple(map(turn, parts.parts)))


@functools.partial(jax.jit, static_argnums=1)
def quantize_int8(kernel, n_in):
    """(int8 values, float32 scale) of `kernel`, reducing over its first
    `n_in` dims: scale = max |w| / 127 (1 where a channel is all zeros),
    values = round(w / scale) clipped to [-127, 127], output-major."""
    w = kernel.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=tuple(range(n_in)))
    scale = scale_from_absmax(amax)
    return to_output_major(int8_values(w, scale), n_in), scale


def int8_values(w, scale):
    """round(w / scale) clipped to [-127, 127], as int8 (w in float32, in
    the kernel's order)."""
    return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)


def add_int8_weights(layer, kernel_shape, kernel_layout, kernel_padding, n_in, scale, values,
                     kernel_parts=None, scale_parts=None):
    """`layer`'s (kernel_scale, kernel) for an int8 kernel of `kernel_shape`
    (*in_dims, *out_dims), split as `kernel_layout` says and padded as
    `kernel_padding` (an `AxisPadding` or None per dim): the float32 scale
    of the output dims, made first (the order saved files follow), and the
    int8 values output-major. Both non-trainable; `scale` and `values` are
    initializers or global arrays (a checkpoint source fills them instead).
    `kernel_parts`, `scale_parts`: the layer's `Fused` parts of the float
    kernel and of its output dims (None: not fused)."""
    kernel_scale = layer.add_sharded_weight(
        "kernel_scale", kernel_shape[n_in:], kernel_layout[n_in:], scale, trainable=False, dtype="float32",
        padding=kernel_padding[n_in:], parts=scale_parts,
    )
    kernel = layer.add_sharded_weight(
        "kernel", output_major(kernel_shape, n_in), output_major(kernel_layout, n_in), values, trainable=False,
        dtype="int8", padding=output_major(kernel_padding, n_in), parts=output_major_parts(kernel_parts, n_in),
        inputs_last=n_in,
    )
    return kernel_scale, kernel


def install(layer, kernel_scale, kernel, mode):
    """Puts a quantized (kernel_scale, kernel) in place of `layer.kernel`:
    tracked in that order, the order build() makes a quantized layer's
    variables (saved files follow it); drops the layer's compiled programs."""
    layer._tracker.unlock()
    layer._untrack_variable(layer.kernel)
    layer.kernel_scale, layer.kernel = kernel_scale, kernel
    layer._tracker.lock()
    layer.quantized = mode
    layer._sharded_programs = {}


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
    if int8_matmul_kernel.applies(x2, w2):
        y = int8_matmul_kernel.int8_matmul(x2, w2)
    else:
        y = jnp.einsum(
            "rk,nk->rn", x2, w2.astype(x.dtype), precision=product_precision(x2), preferred_element_type=jnp.float32
        )
    return y.reshape(lead + out_dims)
