"""Decode attention as a Pallas GPU (Triton) kernel, split over the keys.

A decode step has one query per row, so its attention is a read of the
row's cached keys and values, bound by memory bandwidth. One program
handles one (row, kv head, key split): its group of query heads (padded to
16, the smallest tile a GPU matrix unit takes) against keys
[split start, split end) ∩ [start, length) in blocks of `BLOCK` keys, with
an online softmax in float32; blocks past a row's length are never read,
so a short row in a batch of long ones costs only its own keys. The splits'
partial results are merged outside the kernel (flash-decoding): at batch 1
the splits are what keeps every SM busy.

Learned from `jax.experimental.pallas.ops.gpu.decode_attention`; laid out for
tp_zoo's cache (batch, kv_heads, length, head_dim) and per-row lengths.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from tp_zoo import parallel

BLOCK = 64
_MIN_ROWS = 16
# Enough programs to fill an H100/H200 (132 SMs) about twice over.
_TARGET_PROGRAMS = 264
_NUM_WARPS = 4
_MASKED = -1e30

# Set to False to compare with the XLA decode attention (as a benchmark does).
ENABLED = True


def applies(q, k_cache):
    """On NVIDIA GPUs, for 16-bit heads of 64..256 (a power of two), and a
    cache length that is a whole number of blocks."""
    d = q.shape[-1]
    return (
        ENABLED
        and parallel.on_gpu()
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and d in (64, 128, 256)
        and k_cache.shape[2] % BLOCK == 0
    )


def _kernel(lengths_ref, starts_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, blocks_per_split, scale):
    split = pl.program_id(2)
    length = lengths_ref[()]
    start = starts_ref[()]
    first = jnp.maximum(split * blocks_per_split, start // BLOCK)
    last = jnp.minimum((split + 1) * blocks_per_split, pl.cdiv(length, BLOCK))
    q = q_ref[...]
    rows = q.shape[0]
    offsets = jnp.arange(BLOCK)

    def body(j, carry):
        acc, m, l = carry
        keys = pl.ds(j * BLOCK, BLOCK)
        k = k_ref[keys, :]
        scores = plgpu.dot(q, k, trans_b=True).astype(jnp.float32) * scale
        position = j * BLOCK + offsets
        visible = (position < length) & (position >= start)
        scores = jnp.where(visible[None, :], scores, _MASKED)
        m_new = jnp.maximum(m, scores.max(axis=-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new[:, None])
        l = l * correction + p.sum(axis=-1)
        v = v_ref[keys, :]
        acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
        return acc, m_new, l

    init = (
        jnp.zeros((rows, q.shape[1]), jnp.float32),
        jnp.full((rows,), _MASKED, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, l = jax.lax.fori_loop(first, last, body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def decode_attention(q, k_cache, v_cache, lengths, starts=None, interpret=False):
    """q: (batch, heads, head_dim); caches (batch, kv_heads, length, head_dim);
    lengths, starts: (batch,) int, keys [start, length) are visible."""
    b, h, d = q.shape
    kv, t = k_cache.shape[1], k_cache.shape[2]
    group = h // kv
    rows = max(_MIN_ROWS, pl.next_power_of_2(group))
    qg = q.reshape(b, kv, group, d)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    blocks = t // BLOCK
    splits = min(blocks, max(1, -(-_TARGET_PROGRAMS // (b * kv))))
    blocks_per_split = -(-blocks // splits)
    splits = -(-blocks // blocks_per_split)
    lengths = lengths.astype(jnp.int32)
    starts = jnp.zeros_like(lengths) if starts is None else starts.astype(jnp.int32)

    row = lambda i, j, s: (i,)
    cache_spec = pl.BlockSpec((None, None, t, d), lambda i, j, s: (i, j, 0, 0))
    result = lambda shape: parallel.kernel_result(shape, jnp.float32, lengths, starts, qg, k_cache, v_cache)
    out_shape = [result((b, kv, splits, rows, d)), result((b, kv, splits, rows)), result((b, kv, splits, rows))]
    acc, m, l = pl.pallas_call(
        functools.partial(_kernel, blocks_per_split=blocks_per_split, scale=1.0 / d**0.5),
        grid=(b, kv, splits),
        in_specs=[
            pl.BlockSpec((None,), row),
            pl.BlockSpec((None,), row),
            pl.BlockSpec((None, None, rows, d), lambda i, j, s: (i, j, 0, 0)),
            cache_spec,
            cache_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, d), lambda i, j, s: (i, j, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, j, s: (i, j, s, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, j, s: (i, j, s, 0)),
        ],
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=_NUM_WARPS, num_stages=2),
        interpret=interpret,
        name="tp_zoo_decode_attention",
    )(lengths, starts, qg, k_cache, v_cache)
    # Merge the splits: rescale each to the common max, then normalise.
    m_max = m.max(axis=2, keepdims=True)
    weight = jnp.exp(m - m_max)
    total = (l * weight).sum(axis=2)
    out = (acc * weight[..., None]).sum(axis=2) / total[..., None]
    return out[:, :, :group].reshape(b, h, d).astype(q.dtype)
