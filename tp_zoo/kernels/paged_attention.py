"""A decode step's attention over a paged KV cache: one Pallas GPU (Triton)
kernel.

A serving engine keeps keys and values in pages of `page_size` positions,
shared by all rows (k_pages, v_pages: (kv_heads, num_pages, page_size,
head_dim)); a row's table lists its pages in order, so the key at position
p is at page tables[row, p // page_size], slot p % page_size. One program
handles one (row, kv head, split of the row's table): its group of query
heads (repeated to at least 16 rows, the smallest tile a GPU matrix unit
takes) against its pages in steps of whole pages, each step's page ids read
from the table, with an online softmax in float32. Pages after the row's
position and before its window's start are never read, nor any table entry
past them (those entries are arbitrary); the keys of a step's pages outside
[start, position] are masked out of the loads, so they are neither read nor
can they leak. The splits' partial results are merged outside the kernel
(flash-decoding), as in `decode_attention`. Keys per step, split target,
warps and stages: `PagedAttentionConfig`, the one in force when traced
(`tp_zoo.kernels.configured`).

Learned from `jax.experimental.pallas.ops.gpu.paged_attention`; laid out as
`decode_attention`, with per-row positions and windows.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from tp_zoo import parallel
from tp_zoo.kernels import configuration
from tp_zoo.kernels import flash_decoding


def applies(q, k_pages):
    """On NVIDIA GPUs for 16-bit heads of 64..256 (a power of two), or
    anywhere when forced; for pages of a power of two >= 16 positions (a
    step's keys must be a block the matrix unit takes)."""
    config = configuration.active().paged_attention
    d = q.shape[-1]
    page_size = k_pages.shape[2]
    built_for = parallel.on_gpu() and q.dtype in (jnp.bfloat16, jnp.float16) and d in (64, 128, 256)
    pages_fit = page_size >= 16 and page_size & (page_size - 1) == 0
    return config.enabled and (config.forced or built_for) and pages_fit


def _kernel(
    positions_ref, starts_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref,
    *, rows, pages_per_split, pages_per_step, scale,
):
    split = pl.program_id(2)
    page_size, d = k_ref.shape[1:]
    block = pages_per_step * page_size
    position = positions_ref[()]
    start = starts_ref[()]
    first = jnp.maximum(split * pages_per_split, start // page_size)
    last = jnp.minimum((split + 1) * pages_per_split, position // page_size + 1)
    # The group's queries repeated to the `rows` the matrix unit takes; the
    # merge drops the copies.
    q = q_ref[...]
    q = jnp.broadcast_to(q, (rows // q.shape[0], *q.shape)).reshape(rows, d)
    lanes = jnp.arange(d)[None, :]

    def body(step, carry):
        acc, m, l = carry
        keys = (first + step * pages_per_step) * page_size + jnp.arange(block)  # their positions
        visible = (keys >= start) & (keys <= position) & (keys < last * page_size)
        # Each key's page id; a step running past the split's last page reads
        # the table at that page instead (its keys are masked out below).
        pages = tables_ref[jnp.minimum(keys // page_size, last - 1)]
        # Whole-array indices: a gather Triton lowers to one masked load and
        # Pallas' interpreter can run.
        at = (pages[:, None], (keys % page_size)[:, None], lanes)
        mask = jnp.broadcast_to(visible[:, None], (block, d))
        k = plgpu.load(k_ref.at[at], mask=mask, other=0)
        scores = plgpu.dot(q, k, trans_b=True).astype(jnp.float32) * scale
        scores = jnp.where(visible[None, :], scores, flash_decoding.MASKED)
        m_new = jnp.maximum(m, scores.max(axis=-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new[:, None])
        l = l * correction + p.sum(axis=-1)
        v = plgpu.load(v_ref.at[at], mask=mask, other=0)
        acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
        return acc, m_new, l

    init = (
        jnp.zeros((rows, d), jnp.float32),
        jnp.full((rows,), flash_decoding.MASKED, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, l = jax.lax.fori_loop(0, pl.cdiv(last - first, pages_per_step), body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def paged_decode_attention(q, k_pages, v_pages, tables, positions, starts=None, interpret=None):
    """Each row's query against its keys at positions [start, position]
    (inclusive), read through its page table.

    q: (batch, heads, head_dim); k_pages, v_pages: (kv_heads, num_pages,
    page_size, head_dim), of q's dtype, already written (the new token's key
    and value included); tables: (batch, table_width) int page ids;
    positions, starts: (batch,) int (starts None: zeros), start <= position
    < table_width x page_size. Query head i reads kv head i // (heads //
    kv_heads). Table entries past a row's position (or before its start's
    page) are never read. `interpret`: run by Pallas' interpreter (None: as
    the configuration in force says). Returns (batch, heads, head_dim) in
    q's dtype.
    """
    config = configuration.active().paged_attention
    interpret = config.interpret if interpret is None else interpret
    b, h, d = q.shape
    kv, num_pages, page_size, _ = k_pages.shape
    width = tables.shape[1]
    qg, group, group_block = flash_decoding.grouped_queries(q, kv)
    rows = max(flash_decoding.MIN_ROWS, group_block)
    pages_per_step = max(1, config.block // page_size)
    splits, pages_per_split = flash_decoding.splits(width, b * kv, config.target_programs)
    positions = positions.astype(jnp.int32)
    starts = jnp.zeros_like(positions) if starts is None else starts.astype(jnp.int32)
    tables = tables.astype(jnp.int32)

    per_row, per_split = flash_decoding.PER_ROW, flash_decoding.per_split
    per_head = pl.BlockSpec((None, num_pages, page_size, d), lambda i, j, s: (j, 0, 0, 0))
    inputs = (positions, starts, tables, qg, k_pages, v_pages)
    result = lambda shape: parallel.kernel_result(shape, jnp.float32, *inputs)
    acc, m, l = pl.pallas_call(
        functools.partial(
            _kernel, rows=rows, pages_per_split=pages_per_split, pages_per_step=pages_per_step, scale=1.0 / d**0.5
        ),
        grid=(b, kv, splits),
        in_specs=[
            per_row,
            per_row,
            pl.BlockSpec((None, width), lambda i, j, s: (i, 0)),
            pl.BlockSpec((None, None, group_block, d), lambda i, j, s: (i, j, 0, 0)),
            per_head,
            per_head,
        ],
        out_specs=[per_split(rows, d), per_split(rows), per_split(rows)],
        out_shape=[result((b, kv, splits, rows, d)), result((b, kv, splits, rows)), result((b, kv, splits, rows))],
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="tp_zoo_paged_attention",
    )(*inputs)
    out = flash_decoding.merge(acc, m, l)
    return out[:, :, :group].reshape(b, h, d).astype(q.dtype)
