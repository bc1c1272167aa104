"""x @ int8 weights for a few rows, as a Pallas GPU (Triton) kernel.

A decode step multiplies a handful of rows by every weight matrix: bound by
the bytes of the weights. XLA converts an int8 operand to bf16 in a separate
pass (written out and read back, three times the int8 bytes); this kernel
loads the int8 block and converts it in registers, so each weight byte is
read once. One program handles one (block of `BLOCK_N` output columns,
split of the reduction dim); the rows are padded to 16, the smallest tile a
GPU matrix unit takes. Products accumulate in float32; the splits are
summed outside the kernel, as the decode attention merges its splits: with
few output columns the splits are what keeps every SM busy.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK_N = 128
BLOCK_K = 128
MAX_ROWS = 64  # more rows than this: compute-bound enough for XLA's GEMM
_MIN_ROWS = 16
# Enough programs to fill an H100/H200 (132 SMs) about twice over.
TARGET_PROGRAMS = 264
NUM_WARPS = 4
NUM_STAGES = 3

# Set to False to compare with XLA's int8 product (as a benchmark does).
ENABLED = True


def applies(x, values):
    """On NVIDIA GPUs, for 16-bit rows (at most MAX_ROWS of them) times a
    (K, N) int8 matrix of whole blocks."""
    k, n = values.shape
    return (
        ENABLED
        and jax.devices()[0].platform == "gpu"
        and x.dtype in (jnp.bfloat16, jnp.float16)
        and x.shape[0] <= MAX_ROWS
        and k % BLOCK_K == 0
        and n % BLOCK_N == 0
    )


def _kernel(x_ref, w_ref, o_ref, *, blocks_per_split):
    split = pl.program_id(1)

    def body(j, acc):
        ks = pl.ds(j * BLOCK_K, BLOCK_K)
        x = x_ref[:, ks]
        w = w_ref[ks, :].astype(x.dtype)  # exact: |values| <= 127
        return acc + plgpu.dot(x, w).astype(jnp.float32)

    first = split * blocks_per_split
    acc = jax.lax.fori_loop(
        first, first + blocks_per_split, body, jnp.zeros((x_ref.shape[0], BLOCK_N), jnp.float32)
    )
    o_ref[...] = acc


def int8_matmul(x, values, interpret=False):
    """x: (rows, K) bf16/f16; values: (K, N) int8 -> (rows, N) float32
    products x @ values (unscaled)."""
    m, k = x.shape
    n = values.shape[1]
    rows = max(_MIN_ROWS, pl.next_power_of_2(m))
    x = jnp.pad(x, ((0, rows - m), (0, 0)))
    n_blocks, k_blocks = n // BLOCK_N, k // BLOCK_K
    # The most splits up to the target that divide the reduction evenly.
    splits = max(s for s in range(1, k_blocks + 1) if k_blocks % s == 0 and n_blocks * s <= max(TARGET_PROGRAMS, n_blocks))
    out = pl.pallas_call(
        functools.partial(_kernel, blocks_per_split=k_blocks // splits),
        grid=(n_blocks, splits),
        in_specs=[
            pl.BlockSpec((rows, k), lambda i, s: (0, 0)),
            pl.BlockSpec((k, BLOCK_N), lambda i, s: (0, i)),
        ],
        out_specs=pl.BlockSpec((None, rows, BLOCK_N), lambda i, s: (s, 0, i)),
        out_shape=jax.ShapeDtypeStruct((splits, rows, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name="tp_zoo_int8_matmul",
    )(x, values)
    return out.sum(axis=0)[:m]
