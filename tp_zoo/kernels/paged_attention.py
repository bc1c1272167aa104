"""A decode step's cache write and attention over a paged KV cache: one
Pallas GPU (Triton) kernel.

A serving engine keeps keys and values in pages of `page_size` positions,
shared by all rows (k_pages, v_pages: (kv_heads, num_pages, page_size,
head_dim)); a row's table lists its pages in order, so the key at position
p is at page tables[row, p // page_size], slot p % page_size. One program
handles one (row, kv head, split): its group of query heads (repeated to at
least 16 rows, the smallest tile a GPU matrix unit takes) against one of
`splits` equal runs of the pages the row reads, [start, position] (cut at
run time, so that every split of a short row works however wide its table),
in steps of whole pages, each step's page ids read from the table, with an
online softmax in float32. Pages after the row's position and before its
window's start are never read, nor any table entry past them (those entries
are arbitrary); the keys of a step's pages outside [start, position] are
masked out of the loads, so they are neither read nor can they leak. The
program whose run holds the new position writes the new key and value
there, in place, as `decode_attention` does. The splits' partial results
are merged outside the kernel (flash-decoding), as in `decode_attention`. Keys per step, split target,
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
    positions_ref, starts_ref, tables_ref, q_ref, k_new_ref, v_new_ref, k_ref, v_ref,
    o_ref, m_ref, l_ref, k_out_ref, v_out_ref, *, rows, splits, pages_per_step, scale,
):
    split = pl.program_id(2)
    page_size, d = k_ref.shape[1:]
    block = pages_per_step * page_size
    position = positions_ref[()]
    start = starts_ref[()]
    # The row's pages [start's, position's] in `splits` runs; runs past the
    # last page (a row of fewer pages than splits) are empty.
    low, high = start // page_size, position // page_size + 1
    run = pl.cdiv(high - low, splits)
    first = low + split * run
    last = jnp.minimum(high, first + run)
    # The group's queries repeated to the `rows` the matrix unit takes; the
    # merge drops the copies.
    q = q_ref[...]
    q = jnp.broadcast_to(q, (rows // q.shape[0], *q.shape)).reshape(rows, d)
    k_new = k_new_ref[...]
    v_new = v_new_ref[...]
    lanes = jnp.arange(d)[None, :]

    # The run holding the new position writes its key and value there (the
    # pages are aliased to k_out/v_out: written in place). Only this program
    # covers that slot, and it takes the new key and value from k_new/v_new,
    # never loading the slot, so the order of the store and its loads does
    # not matter. Whole-array indices, as the loads below.
    @pl.when((first <= position // page_size) & (position // page_size < last))
    def _():
        at = (jnp.full((1, 1), tables_ref[position // page_size]), jnp.full((1, 1), position % page_size), lanes)
        plgpu.store(k_out_ref.at[at], k_new[None, :])
        plgpu.store(v_out_ref.at[at], v_new[None, :])

    def body(step, carry):
        acc, m, l = carry
        keys = (first + step * pages_per_step) * page_size + jnp.arange(block)  # their positions
        visible = (keys >= start) & (keys <= position) & (keys < last * page_size)
        is_new = (keys == position)[:, None]
        # Each key's page id; a step running past the run's last page reads
        # the table at that page instead (its keys are masked out below).
        pages = tables_ref[jnp.minimum(keys // page_size, last - 1)]
        # Whole-array indices: a gather Triton lowers to one masked load and
        # Pallas' interpreter can run.
        at = (pages[:, None], (keys % page_size)[:, None], lanes)
        mask = jnp.broadcast_to(visible[:, None] & ~is_new, (block, d))
        k = jnp.where(is_new, k_new[None, :], plgpu.load(k_ref.at[at], mask=mask, other=0))
        scores = plgpu.dot(q, k, trans_b=True).astype(jnp.float32) * scale
        scores = jnp.where(visible[None, :], scores, flash_decoding.MASKED)
        m_new = jnp.maximum(m, scores.max(axis=-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new[:, None])
        l = l * correction + p.sum(axis=-1)
        v = jnp.where(is_new, v_new[None, :], plgpu.load(v_ref.at[at], mask=mask, other=0))
        acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
        return acc, m_new, l

    init = (
        jnp.zeros((rows, d), jnp.float32),
        jnp.full((rows,), flash_decoding.MASKED, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    steps = pl.cdiv(jnp.maximum(last - first, 0), pages_per_step)
    acc, m, l = jax.lax.fori_loop(0, steps, body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def paged_decode_step(q, k_new, v_new, k_pages, v_pages, tables, positions, starts=None, interpret=None):
    """Writes each row's new key and value at its position into the page its
    table names there, in place, and attends its queries to its keys at
    positions [start, position] (inclusive), read through its table.

    q: (batch, heads, head_dim); k_new, v_new: (batch, kv_heads, head_dim);
    k_pages, v_pages: (kv_heads, num_pages, page_size, head_dim), all of one
    dtype; tables: (batch, table_width) int page ids; positions, starts:
    (batch,) int (starts None: zeros), start <= position < table_width x
    page_size. Query head i reads kv head i // (heads // kv_heads). Table
    entries past a row's position (or before its start's page) are never
    read. Rows may share a page only where none of them reads it (padding
    rows' writes). `interpret`: run by Pallas' interpreter (None: as the
    configuration in force says). Returns (out (batch, heads, head_dim) in
    q's dtype, k_pages, v_pages).
    """
    operands, group, group_block = flash_decoding.separate_operands(q, k_new, v_new, k_pages.shape[0])
    return _paged_step(operands, group, group_block, k_pages, v_pages, tables, positions, starts, interpret)


def paged_decode_step_fused(qkv, k_pages, v_pages, tables, positions, starts=None, interpret=None):
    """`paged_decode_step` from one array, the fused q/k/v product (batch,
    kv_heads, 2 + group, head_dim), read in place as `decode_attention`'s
    `decode_step_fused` reads it (a group of a power of two). Returns (out
    (batch, kv_heads x group, head_dim), k_pages, v_pages)."""
    operands, group = flash_decoding.fused_operands(qkv)
    return _paged_step(operands, group, group, k_pages, v_pages, tables, positions, starts, interpret)


def _paged_step(operands, group, group_block, k_pages, v_pages, tables, positions, starts, interpret):
    """The kernel and the merge of its splits. `operands`: (array, BlockSpec)
    of the queries (a block of `group_block` rows per (row, kv head)), the
    new keys and the new values."""
    config = configuration.active().paged_attention
    interpret = config.interpret if interpret is None else interpret
    (q, q_spec), (k_new, k_spec), (v_new, v_spec) = operands
    b = q.shape[0]
    kv, num_pages, page_size, d = k_pages.shape
    width = tables.shape[1]
    rows = max(flash_decoding.MIN_ROWS, group_block)
    pages_per_step = max(1, config.block // page_size)
    splits, _ = flash_decoding.splits(width, b * kv, config.target_programs)
    positions = positions.astype(jnp.int32)
    starts = jnp.zeros_like(positions) if starts is None else starts.astype(jnp.int32)
    tables = tables.astype(jnp.int32)

    per_row, per_split = flash_decoding.PER_ROW, flash_decoding.per_split
    pool = pl.BlockSpec((None, num_pages, page_size, d), lambda i, j, s: (j, 0, 0, 0))
    inputs = (positions, starts, tables, q, k_new, v_new, k_pages, v_pages)
    result = lambda shape, dtype=jnp.float32: parallel.kernel_result(shape, dtype, *inputs)
    acc, m, l, k_pages, v_pages = pl.pallas_call(
        functools.partial(_kernel, rows=rows, splits=splits, pages_per_step=pages_per_step, scale=1.0 / d**0.5),
        grid=(b, kv, splits),
        in_specs=[per_row, per_row, pl.BlockSpec((None, width), lambda i, j, s: (i, 0)), q_spec, k_spec, v_spec,
                  pool, pool],
        out_specs=[per_split(rows, d), per_split(rows), per_split(rows), pool, pool],
        out_shape=[
            result((b, kv, splits, rows, d)),
            result((b, kv, splits, rows)),
            result((b, kv, splits, rows)),
            result(k_pages.shape, k_pages.dtype),
            result(v_pages.shape, v_pages.dtype),
        ],
        input_output_aliases={6: 3, 7: 4},
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="tp_zoo_paged_attention",
    )(*inputs)
    out = flash_decoding.merge(acc, m, l)
    return out[:, :, :group].reshape(b, kv * group, d).astype(q.dtype), k_pages, v_pages


def _chunk_kernel(
    starts_ref, counts_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, *, group, tokens, pages_per_step, scale, window,
):
    block_index = pl.program_id(2)
    page_size, d = k_ref.shape[1:]
    keys_per_step = pages_per_step * page_size
    start = starts_ref[()]
    count = counts_ref[()]
    # The block's query rows: `tokens` tokens x `group` heads, token-major.
    first_token = block_index * tokens
    token = first_token + jnp.arange(tokens * group) // group
    positions = start + token
    valid = token < count
    lowest = jnp.maximum(start + first_token + 1 - window, 0) if window else 0
    highest = start + jnp.minimum(first_token + tokens, count) - 1
    low_page = lowest // page_size
    pages = jnp.where(first_token < count, highest // page_size + 1 - low_page, 0)
    q = q_ref[...]
    lanes = jnp.arange(d)[None, :]

    def body(step, carry):
        acc, m, l = carry
        keys = (low_page + step * pages_per_step) * page_size + jnp.arange(keys_per_step)
        readable = (keys >= lowest) & (keys <= highest)
        at = (tables_ref[jnp.minimum(keys // page_size, highest // page_size)][:, None],
              (keys % page_size)[:, None], lanes)
        mask = jnp.broadcast_to(readable[:, None], (keys_per_step, d))
        k = plgpu.load(k_ref.at[at], mask=mask, other=0)
        scores = plgpu.dot(q, k, trans_b=True).astype(jnp.float32) * scale
        visible = readable[None, :] & (keys[None, :] <= positions[:, None]) & valid[:, None]
        if window:
            visible &= keys[None, :] > positions[:, None] - window
        scores = jnp.where(visible, scores, flash_decoding.MASKED)
        m_new = jnp.maximum(m, scores.max(axis=-1))
        correction = jnp.exp(m - m_new)
        p = jnp.where(visible, jnp.exp(scores - m_new[:, None]), 0.0)
        l = l * correction + p.sum(axis=-1)
        v = plgpu.load(v_ref.at[at], mask=mask, other=0)
        acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
        return acc, m_new, l

    rows = tokens * group
    init = (
        jnp.zeros((rows, d), jnp.float32),
        jnp.full((rows,), flash_decoding.MASKED, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, _, l = jax.lax.fori_loop(0, pl.cdiv(pages, pages_per_step), body, init)
    # Padding tokens see no key: zeros, not 0 / 0.
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


def paged_chunk_attention(q, k_pages, v_pages, tables, starts, counts, window=None, interpret=None):
    """Prompts' chunks over a paged KV cache: row r's tokens 0..counts[r]-1
    sit at positions starts[r], starts[r] + 1, ..., their keys and values
    already written into the pages of its table; each token's query heads
    attend to the row's keys up to its position (within `window`, the
    last `window` positions, if given). One program per (row, kv head,
    block of tokens): the block's tokens x its group of query heads as one
    tile against the row's pages [its first visible, its last token's], in
    steps of whole pages read through the table, with an online softmax in
    float32. Tokens past a row's count (padding) get zeros; table entries
    outside the pages read are never read.

    q: (rows, width, heads, head_dim); k_pages, v_pages: (kv_heads,
    num_pages, page_size, head_dim), of q's dtype; tables: (rows,
    table_width) int; starts, counts: (rows,) int. Returns (rows, width,
    heads, head_dim) in q's dtype.
    """
    config = configuration.active().paged_attention
    interpret = config.interpret if interpret is None else interpret
    rows, width, h, d = q.shape
    kv, num_pages, page_size, _ = k_pages.shape
    qg, group, group_block = flash_decoding.grouped_queries(q.reshape(rows * width, h, d), kv)
    # (rows, kv, width x group block, d): each kv head's queries token-major.
    qg = jnp.swapaxes(qg.reshape(rows, width, kv, group_block, d), 1, 2).reshape(rows, kv, width * group_block, d)
    tokens = min(width, max(1, config.chunk_query_rows // group_block))
    block_rows = tokens * group_block
    pages_per_step = max(1, config.block // page_size)
    inputs = (starts.astype(jnp.int32), counts.astype(jnp.int32), tables.astype(jnp.int32), qg, k_pages, v_pages)
    pool = pl.BlockSpec((None, num_pages, page_size, d), lambda i, j, b: (j, 0, 0, 0))
    per_row = pl.BlockSpec((None,), lambda i, j, b: (i,))
    per_block = pl.BlockSpec((None, None, block_rows, d), lambda i, j, b: (i, j, b, 0))
    out = pl.pallas_call(
        functools.partial(_chunk_kernel, group=group_block, tokens=tokens, pages_per_step=pages_per_step,
                          scale=1.0 / d**0.5, window=window),
        grid=(rows, kv, width // tokens),
        in_specs=[per_row, per_row, pl.BlockSpec((None, tables.shape[1]), lambda i, j, b: (i, 0)), per_block,
                  pool, pool],
        out_specs=per_block,
        out_shape=parallel.kernel_result(qg.shape, q.dtype, *inputs),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="tp_zoo_paged_chunk_attention",
    )(*inputs)
    out = jnp.swapaxes(out.reshape(rows, kv, width, group_block, d), 1, 2)[:, :, :, :group]
    return out.reshape(rows, width, h, d)
