"""Weight-only int8: per-output-channel absmax quantization of kernels.

A kernel of shape (*in_dims, *out_dims) becomes int8 values of the same
shape and layout plus a float32 scale of shape out_dims, split like the
kernel's output dims. The scale is the max |w| over the whole reduction
(input) dims / 127, computed on the global array (XLA adds the collective
where the reduction dim is split), so the int8 values and scales are the
same at every tp. The layer computes x @ int8 values in float32
(`int8_product`), times the scale (after the all-reduce of a row-parallel
layer: the scale is per output channel, the same on every device), plus
the bias.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tp_zoo.layers import int8_matmul_kernel
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
    """An int8 kernel (local shard) and its float32 per-output-channel scale."""

    values: jax.Array
    scale: jax.Array


def scale_from_absmax(amax):
    """max |w| per channel -> its scale (1 where a channel is all zeros).
    One definition, so that quantizing while loading rounds the same way."""
    return jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=1)
def quantize_int8(kernel, n_in):
    """(int8 values, float32 scale) of `kernel`, reducing over its first
    `n_in` dims: scale = max |w| / 127 (1 where a channel is all zeros),
    values = round(w / scale) clipped to [-127, 127]."""
    w = kernel.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=tuple(range(n_in)))
    scale = scale_from_absmax(amax)
    return int8_values(w, scale), scale


def int8_values(w, scale):
    """round(w / scale) clipped to [-127, 127], as int8 (w in float32)."""
    return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)


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
    """values * scale (broadcast on the output dims) in `dtype`."""
    return (values.astype(jnp.float32) * scale).astype(dtype)


def int8_product(x, values, n_in):
    """x @ values in float32, unscaled: x's trailing `n_in` dims against
    values' leading `n_in` dims. A few rows on a GPU (decode) go through
    the Pallas kernel, which reads each int8 byte once; otherwise XLA, the
    values converted to x's dtype (exact) and accumulated in float32."""
    in_dims, out_dims = values.shape[:n_in], values.shape[n_in:]
    lead = x.shape[: x.ndim - n_in]
    x2 = x.reshape(-1, math.prod(in_dims))
    w2 = values.reshape(x2.shape[1], math.prod(out_dims))
    if int8_matmul_kernel.applies(x2, w2.T):
        y = int8_matmul_kernel.int8_matmul(x2, w2.T)
    else:
        y = jnp.dot(x2, w2.astype(x.dtype), precision=product_precision(x2), preferred_element_type=jnp.float32)
    return y.reshape(lead + out_dims)
