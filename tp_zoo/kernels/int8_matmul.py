"""x @ int8 weights for a few rows, as a Pallas GPU (Triton) kernel.

A decode step multiplies a handful of rows by every weight matrix: bound by
the bytes of the weights. The int8 values are stored output-major, (N, K):
each output channel's weights are contiguous along the reduction dim, the
order a GPU matrix unit takes its operand in, so a block goes from memory
to the matrix unit without being rearranged byte by byte in shared memory
(with (K, N) blocks that rearrangement bound the kernel at about half the
memory bandwidth: docs/performance-notes.md).

One program handles one (block of `block_n` output channels, split of the
reduction dim) for a block of at least 16 rows, the smallest tile the
matrix unit takes: rows past x's are masked, not padded in memory.
Products accumulate in float32; the splits are summed outside the kernel.
There are only as many splits as it takes to reach `target_programs`
programs: each writes a (rows, N) float32 partial. Block sizes, split target,
warps and stages: `Int8MatmulConfig`, the one in force when traced
(`tp_zoo.kernels.configured`).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from tp_zoo import parallel
from tp_zoo.kernels import configuration

_MIN_ROWS = 16


def applies(x, values):
    """On NVIDIA GPUs for 16-bit rows, or anywhere when forced; for at most
    `max_rows` rows times an (N, K) int8 matrix of whole blocks."""
    config = configuration.active().int8_matmul
    n, k = values.shape
    built_for = parallel.on_gpu() and x.dtype == jnp.bfloat16
    return (
        config.enabled
        and (config.forced or built_for)
        and x.shape[0] <= config.max_rows
        and k % config.block_k == 0
        and n % config.block_n == 0
    )


def _kernel(x_ref, w_ref, o_ref, *, rows, blocks_per_split, block_k):
    split = pl.program_id(1)
    # The block has rows past x's last one: masked out of loads and stores.
    real_rows = (jnp.arange(o_ref.shape[0]) < rows)[:, None]

    def body(j, acc):
        ks = pl.ds(j * block_k, block_k)
        x = plgpu.load(x_ref.at[:, ks], mask=real_rows, other=0.0)
        w = w_ref[:, ks].astype(jnp.bfloat16)
        return acc + plgpu.dot(x, w, trans_b=True).astype(jnp.float32)

    first = split * blocks_per_split
    acc = jax.lax.fori_loop(first, first + blocks_per_split, body, jnp.zeros(o_ref.shape, jnp.float32))
    plgpu.store(o_ref, acc, mask=real_rows)


def _splits(n_blocks, k_blocks, target_programs):
    """The fewest splits of the reduction (dividing it evenly) that bring
    the programs up to `target_programs`, or the most there are."""
    for s in range(1, k_blocks + 1):
        if k_blocks % s == 0 and n_blocks * s >= target_programs:
            return s
    return k_blocks


def int8_matmul(x, values, interpret=None):
    """x: (rows, K) bf16; values: (N, K) int8 -> (rows, N) float32
    products x @ values.T (unscaled). `interpret`: run by Pallas'
    interpreter (None: as the configuration in force says)."""
    config = configuration.active().int8_matmul
    interpret = config.interpret if interpret is None else interpret
    m, k = x.shape
    n = values.shape[0]
    # Blocks of `rows` rows over the m there are (loads and stores past
    # them masked in the kernel), so no padded copy of x is made.
    rows = max(_MIN_ROWS, pl.next_power_of_2(m))
    n_blocks, k_blocks = n // config.block_n, k // config.block_k
    splits = _splits(n_blocks, k_blocks, config.target_programs)
    out = pl.pallas_call(
        functools.partial(_kernel, rows=m, blocks_per_split=k_blocks // splits, block_k=config.block_k),
        grid=(n_blocks, splits),
        in_specs=[
            pl.BlockSpec((rows, k), lambda i, s: (0, 0)),
            pl.BlockSpec((config.block_n, k), lambda i, s: (i, 0)),
        ],
        out_specs=pl.BlockSpec((None, rows, config.block_n), lambda i, s: (s, 0, i)),
        out_shape=parallel.kernel_result((splits, m, n), jnp.float32, x, values),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="tp_zoo_int8_matmul",
    )(x, values)
    return out.sum(axis=0)
