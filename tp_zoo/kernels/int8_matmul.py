"""x @ int8 weights for a few rows, as a Pallas GPU (Triton) kernel.

A decode step multiplies a handful of rows by every weight matrix: bound by
the bytes of the weights. The int8 values are stored output-major, (N, K):
each output channel's weights are contiguous along the reduction dim, the
order a GPU matrix unit takes its operand in, so a block goes from memory
to the matrix unit without being rearranged byte by byte in shared memory
(with (K, N) blocks that rearrangement bound the kernel at about half the
memory bandwidth: docs/performance-notes.md).

One program handles one (block of `BLOCK_N` output channels, split of the
reduction dim) for a block of at least 16 rows, the smallest tile the
matrix unit takes: rows past x's are masked, not padded in memory.
Products accumulate in float32; the splits are summed outside the kernel.
There are only as many splits as it takes to reach `TARGET_PROGRAMS`
programs: each writes a (rows, N) float32 partial.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from tp_zoo import parallel

BLOCK_N = 64
BLOCK_K = 128
MAX_ROWS = 64  # more rows than this: compute-bound enough for XLA's GEMM
_MIN_ROWS = 16
# The fewest splits that give at least this many programs (one per H200 SM
# measured fastest with output-major blocks).
TARGET_PROGRAMS = 132
NUM_WARPS = 4
NUM_STAGES = 4

# Set to False to compare with XLA's int8 product (as a benchmark does).
ENABLED = True


def applies(x, values):
    """On NVIDIA GPUs, for 16-bit rows (at most MAX_ROWS of them) times an
    (N, K) int8 matrix of whole blocks."""
    n, k = values.shape
    return (
        ENABLED
        and parallel.on_gpu()
        and x.dtype == jnp.bfloat16
        and x.shape[0] <= MAX_ROWS
        and k % BLOCK_K == 0
        and n % BLOCK_N == 0
    )


def _kernel(x_ref, w_ref, o_ref, *, rows, blocks_per_split):
    split = pl.program_id(1)
    # The block has rows past x's last one: masked out of loads and stores.
    real_rows = (jnp.arange(o_ref.shape[0]) < rows)[:, None]

    def body(j, acc):
        ks = pl.ds(j * BLOCK_K, BLOCK_K)
        x = plgpu.load(x_ref.at[:, ks], mask=real_rows, other=0.0)
        w = w_ref[:, ks].astype(jnp.bfloat16)
        return acc + plgpu.dot(x, w, trans_b=True).astype(jnp.float32)

    first = split * blocks_per_split
    acc = jax.lax.fori_loop(first, first + blocks_per_split, body, jnp.zeros(o_ref.shape, jnp.float32))
    plgpu.store(o_ref, acc, mask=real_rows)


def _splits(n_blocks, k_blocks):
    """The fewest splits of the reduction (dividing it evenly) that bring
    the programs up to TARGET_PROGRAMS, or the most there are."""
    for s in range(1, k_blocks + 1):
        if k_blocks % s == 0 and n_blocks * s >= TARGET_PROGRAMS:
            return s
    return k_blocks


def int8_matmul(x, values, interpret=False):
    """x: (rows, K) bf16; values: (N, K) int8 -> (rows, N) float32
    products x @ values.T (unscaled)."""
    m, k = x.shape
    n = values.shape[0]
    # Blocks of `rows` rows over the m there are (loads and stores past
    # them masked in the kernel), so no padded copy of x is made.
    rows = max(_MIN_ROWS, pl.next_power_of_2(m))
    n_blocks, k_blocks = n // BLOCK_N, k // BLOCK_K
    splits = _splits(n_blocks, k_blocks)
    out = pl.pallas_call(
        functools.partial(_kernel, rows=m, blocks_per_split=k_blocks // splits),
        grid=(n_blocks, splits),
        in_specs=[
            pl.BlockSpec((rows, k), lambda i, s: (0, 0)),
            pl.BlockSpec((BLOCK_N, k), lambda i, s: (i, 0)),
        ],
        out_specs=pl.BlockSpec((None, rows, BLOCK_N), lambda i, s: (s, 0, i)),
        out_shape=parallel.kernel_result((splits, m, n), jnp.float32, x, values),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name="tp_zoo_int8_matmul",
    )(x, values)
    return out.sum(axis=0)
