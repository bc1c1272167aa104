"""RMS normalization of a few rows as one Pallas GPU (Triton) kernel.

XLA computes an RMS norm as two kernels, the mean of squares and then the
scaling. At a decode step's one to a few rows each is a launch-bound
kernel of a couple of microseconds, and a step has two norms per layer;
one program per row does both in one kernel.
"""

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from tp_zoo import parallel

MAX_ROWS = 64  # more rows: XLA's kernels are not launch-bound
MAX_WIDTH = 16384  # one row in one program's registers

# Set to False to compare with XLA's norm (as a benchmark does).
ENABLED = True


def applies(x):
    """On NVIDIA GPUs, for at most MAX_ROWS rows of a power-of-two width (a
    Triton block) of at most MAX_WIDTH."""
    if not all(isinstance(d, int) for d in x.shape):  # symbolic (Keras' shape inference)
        return False
    width = x.shape[-1]
    return (
        ENABLED
        and parallel.on_gpu()
        and math.prod(x.shape[:-1]) <= MAX_ROWS
        and width <= MAX_WIDTH
        and width == pl.next_power_of_2(width)
    )


def _kernel(x_ref, scale_ref, o_ref, *, epsilon):
    x = x_ref[...].astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + epsilon)
    o_ref[...] = (scale_ref[...] * y.astype(x_ref.dtype)).astype(o_ref.dtype)


def rms_norm(x, scale, epsilon, interpret=False):
    """scale * (x / rms(x)): the mean of squares and the division in float32,
    rounded to x's dtype before the scaling (as Llama's norm), for x of
    any leading dims and `scale` of x's last dim."""
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    out_dtype = jnp.result_type(scale.dtype, x.dtype)
    out = pl.pallas_call(
        lambda x_ref, scale_ref, o_ref: _kernel(x_ref, scale_ref, o_ref, epsilon=epsilon),
        grid=(rows.shape[0],),
        in_specs=[
            pl.BlockSpec((1, width), lambda i: (i, 0)),
            pl.BlockSpec((width,), lambda i: (0,)),
        ],
        out_specs=pl.BlockSpec((1, width), lambda i: (i, 0)),
        out_shape=parallel.kernel_result(rows.shape, out_dtype, rows, scale),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="tp_zoo_rms_norm",
    )(rows, scale)
    return out.reshape(x.shape)
