"""A decode step's cache write and attention: one Pallas GPU (Triton) kernel.

A decode step has one query per row, so its attention is a read of the
row's cached keys and values, bound by memory bandwidth. One program
handles one (row, kv head, key split): its group of query heads (repeated
in registers to at least 16 rows, the smallest tile a GPU matrix unit
takes) against keys [split start, split end) ∩ [start, position] in blocks
of `block` keys, with an online softmax in float32; blocks past a row's
position are never read, so a short row in a batch of long ones costs only
its own keys. The program whose split holds the row's new position also
writes the new key and value into the caches, in place, so the step needs
no separate cache writes. The splits' partial results are merged outside
the kernel (flash-decoding): at batch 1 the splits are what keeps every SM
busy. Block size, split target and warps: `DecodeAttentionConfig`, the one
in force when traced (`tp_zoo.kernels.configured`).

Learned from `jax.experimental.pallas.ops.gpu.decode_attention`; laid out for
tp_zoo's cache (batch, kv_heads, length, head_dim) and per-row positions.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from tp_zoo import parallel
from tp_zoo.kernels import configuration
from tp_zoo.kernels import flash_decoding


def cache_length_multiple():
    """What a cache's length must be a multiple of for the kernel to take it
    (whole blocks of the configuration in force): callers that choose cache
    lengths ask here, so that they follow its block."""
    return configuration.active().decode_attention.block


def applies(q, k_cache):
    """On NVIDIA GPUs for 16-bit heads of 64..256 (a power of two), or
    anywhere when forced; for a cache length of whole blocks."""
    config = configuration.active().decode_attention
    d = q.shape[-1]
    built_for = parallel.on_gpu() and q.dtype in (jnp.bfloat16, jnp.float16) and d in (64, 128, 256)
    return config.enabled and (config.forced or built_for) and k_cache.shape[2] % config.block == 0


def _kernel(
    positions_ref, starts_ref, q_ref, k_new_ref, v_new_ref, k_ref, v_ref,
    o_ref, m_ref, l_ref, k_out_ref, v_out_ref, *, rows, blocks_per_split, scale, block,
):
    split = pl.program_id(2)
    position = positions_ref[()]
    start = starts_ref[()]
    first = jnp.maximum(split * blocks_per_split, start // block)
    last = jnp.minimum((split + 1) * blocks_per_split, position // block + 1)
    # The group's queries repeated to the `rows` the matrix unit takes, here
    # rather than padded in a separate kernel; the merge drops the copies.
    q = q_ref[...]
    q = jnp.broadcast_to(q, (rows // q.shape[0], *q.shape)).reshape(rows, q.shape[1])
    k_new = k_new_ref[...]
    v_new = v_new_ref[...]
    offsets = jnp.arange(block)

    # The one split whose blocks hold the new position writes the new key and
    # value there (the caches are aliased to k_out/v_out: written in place).
    # No other program reads that position, and this one takes the new row
    # from k_new/v_new rather than from the cache, so the order of the store
    # and its loads does not matter.
    @pl.when(split == position // block // blocks_per_split)
    def _():
        k_out_ref[position, :] = k_new
        v_out_ref[position, :] = v_new

    def body(j, carry):
        acc, m, l = carry
        keys = pl.ds(j * block, block)
        key_positions = j * block + offsets
        is_new = (key_positions == position)[:, None]
        k = jnp.where(is_new, k_new[None, :], k_ref[keys, :])
        scores = plgpu.dot(q, k, trans_b=True).astype(jnp.float32) * scale
        visible = (key_positions <= position) & (key_positions >= start)
        scores = jnp.where(visible[None, :], scores, flash_decoding.MASKED)
        m_new = jnp.maximum(m, scores.max(axis=-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new[:, None])
        l = l * correction + p.sum(axis=-1)
        v = jnp.where(is_new, v_new[None, :], v_ref[keys, :])
        acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
        return acc, m_new, l

    init = (
        jnp.zeros((rows, q.shape[1]), jnp.float32),
        jnp.full((rows,), flash_decoding.MASKED, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, l = jax.lax.fori_loop(first, last, body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def decode_step(q, k_new, v_new, k_cache, v_cache, positions, starts=None, interpret=None):
    """Writes each row's new key and value into its caches at its position,
    in place, and attends its queries to keys [start, position] of the row.

    q: (batch, heads, head_dim); k_new, v_new: (batch, kv_heads, head_dim),
    of the caches' dtype; caches (batch, kv_heads, length, head_dim);
    positions, starts: (batch,) int. `interpret`: run by Pallas' interpreter
    (None: as the configuration in force says). Returns (out, k_cache,
    v_cache).
    """
    operands, group, group_block = flash_decoding.separate_operands(q, k_new, v_new, k_cache.shape[1])
    return _decode_step(operands, group, group_block, k_cache, v_cache, positions, starts, interpret)


def decode_step_fused(qkv, k_cache, v_cache, positions, starts=None, interpret=None):
    """`decode_step` from one array, the fused q/k/v product (batch, kv_heads,
    2 + group, head_dim): each kv head's new key, new value, then its group
    of queries (a power of two of them). The kernel reads its three operands
    out of it, so no copies of them are made. Returns (out (batch, kv_heads
    x group, head_dim), k_cache, v_cache)."""
    operands, group = flash_decoding.fused_operands(qkv)
    return _decode_step(operands, group, group, k_cache, v_cache, positions, starts, interpret)


def _decode_step(operands, group, group_block, k_cache, v_cache, positions, starts, interpret):
    """The kernel and the merge of its splits. `operands`: (array, BlockSpec)
    of the queries (a block of `group_block` rows per (row, kv head)), the
    new keys and the new values."""
    config = configuration.active().decode_attention
    interpret = config.interpret if interpret is None else interpret
    (q, q_spec), (k_new, k_spec), (v_new, v_spec) = operands
    b, kv, t, d = k_cache.shape
    rows = max(flash_decoding.MIN_ROWS, group_block)
    splits, blocks_per_split = flash_decoding.splits(t // config.block, b * kv, config.target_programs)
    positions = positions.astype(jnp.int32)
    starts = jnp.zeros_like(positions) if starts is None else starts.astype(jnp.int32)
    per_row, per_split = flash_decoding.PER_ROW, flash_decoding.per_split
    cache = flash_decoding.per_head(t, d)
    inputs = (positions, starts, q, k_new, v_new, k_cache, v_cache)
    result = lambda shape, dtype: parallel.kernel_result(shape, dtype, *inputs)
    acc, m, l, k_cache, v_cache = pl.pallas_call(
        functools.partial(
            _kernel, rows=rows, blocks_per_split=blocks_per_split, scale=1.0 / d**0.5, block=config.block
        ),
        grid=(b, kv, splits),
        in_specs=[per_row, per_row, q_spec, k_spec, v_spec, cache, cache],
        out_specs=[per_split(rows, d), per_split(rows), per_split(rows), cache, cache],
        out_shape=[
            result((b, kv, splits, rows, d), jnp.float32),
            result((b, kv, splits, rows), jnp.float32),
            result((b, kv, splits, rows), jnp.float32),
            result(k_cache.shape, k_cache.dtype),
            result(v_cache.shape, v_cache.dtype),
        ],
        input_output_aliases={5: 3, 6: 4},
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=2),
        interpret=interpret,
        name="tp_zoo_decode_attention",
    )(*inputs)
    out = flash_decoding.merge(acc, m, l)
    return out[:, :, :group].reshape(b, kv * group, d).astype(q.dtype), k_cache, v_cache
