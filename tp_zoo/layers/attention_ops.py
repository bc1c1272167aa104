"""The attention computations one device runs on its own heads.

Shapes: queries (batch, seq, heads, head_dim); keys and values (batch, seq,
kv_heads, head_dim), or in the KV cache (batch, kv_heads, length, head_dim),
so that each row's head is one contiguous (length, head_dim) block a decode
step reads in order. Query head i reads key/value head i // (heads /
kv_heads), as in Hugging Face's `repeat_kv`. Scores and softmax are float32.

- `dense_attention`: the whole score matrix (training on CPU, short inputs).
- `fused_attention`: cuDNN's flash attention (NVIDIA GPUs, 16-bit heads).
- `blockwise_attention`: causal attention in query and key blocks with an
  online softmax, in plain JAX: memory linear in the sequence (prefill off
  cuDNN).
- `decode_step`: one new token per row: its key and value written into the
  cache, its query against the row's cached keys, read once; a Pallas kernel
  that does both on NVIDIA GPUs (`tp_zoo.kernels.decode_attention`), XLA
  elsewhere.
- `paged_attention`: the same over a paged cache (a serving engine's), for
  any number of new tokens per row: pages of (kv_heads, num_pages,
  page_size, head_dim), each row's keys at position p in page
  tables[row, p // page_size], slot p % page_size. On NVIDIA GPUs Pallas
  kernels (`tp_zoo.kernels.paged_attention`) read a row's own pages
  through its table: one new token per row is written and attended by
  one, prompts' chunks, written with XLA's scatter, attend in another;
  elsewhere the row's pages are gathered for XLA.
"""

import jax
import jax.numpy as jnp

from tp_zoo import parallel
from tp_zoo.kernels import decode_attention
from tp_zoo.kernels import paged_attention as paged_kernel
from tp_zoo.layers.precision import product_precision

_MASKED = -1e30

# Set to False to compare with the plain XLA attention (as a benchmark does).
FUSED_ATTENTION = True


def fused_applies(q):
    """cuDNN flash attention: on NVIDIA GPUs, for 16-bit heads of up to 128."""
    return (
        FUSED_ATTENTION
        and parallel.on_gpu()
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] <= 128
        and q.shape[-1] % 8 == 0
    )


def _grouped(q, kv_heads):
    """(b, s, heads, d) -> (b, s, kv_heads, group, d)."""
    b, s, h, d = q.shape
    return q.reshape(b, s, kv_heads, h // kv_heads, d)


def causal_mask(q_pos, k_pos, window):
    """Key k_pos visible from query q_pos: not in the future, within the window."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= q_pos[:, None] - k_pos[None, :] < window
    return mask


def dense_attention(q, k, v, mask):
    """Softmax attention with the whole (batch, heads, q, k) score matrix;
    `mask` broadcasts to (batch, q, k)."""
    b, s, h, d = q.shape
    kv = k.shape[2]
    scores = jnp.einsum(
        "bskgd,btkd->bkgst", _grouped(q, kv), k, precision=product_precision(q, k), preferred_element_type=jnp.float32
    )
    scores = jnp.where(mask[:, None, None], scores * (1.0 / d**0.5), _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v, precision=product_precision(v))
    return out.reshape(b, s, h, d)


def fused_attention(q, k, v, lengths, window):
    """cuDNN's fused (flash) attention: causal, right padding as sequence
    lengths (or None), a sliding window as a local window."""
    local_window = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        local_window_size=local_window, scale=1.0 / q.shape[-1] ** 0.5, implementation="cudnn",
    )


def blockwise_attention(q, k, v, window=None, block=512):
    """Causal attention over q, k, v of the same positions 0..seq-1, one
    block of queries at a time against the key blocks it can see, with an
    online softmax: the largest temporary is one (block x block) score tile
    per head, so memory grows linearly with the sequence."""
    b, s, h, d = q.shape
    kv = k.shape[2]
    block = min(block, s)
    n = -(-s // block)
    pad = n * block - s
    if pad:
        widen = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        q, k, v = widen(q), widen(k), widen(v)
    qb = _grouped(q, kv).reshape(b, n, block, kv, h // kv, d)
    kb = k.reshape(b, n, block, kv, d)
    vb = v.reshape(b, n, block, kv, d)
    scale = 1.0 / d**0.5
    offsets = jnp.arange(block)
    precision = product_precision(q, k, v)

    def query_block(i):
        qi = qb[:, i]
        q_pos = i * block + offsets

        def key_block(j, carry):
            acc, m, l = carry
            scores = jnp.einsum(
                "bskgd,btkd->bkgst", qi, kb[:, j], precision=precision, preferred_element_type=jnp.float32
            )
            mask = causal_mask(q_pos, j * block + offsets, window)
            scores = jnp.where(mask, scores * scale, _MASKED)
            m_new = jnp.maximum(m, scores.max(axis=-1))
            correction = jnp.exp(m - m_new)
            p = jnp.exp(scores - m_new[..., None])
            l = l * correction + p.sum(axis=-1)
            pv = jnp.einsum(
                "bkgst,btkd->bkgsd", p.astype(v.dtype), vb[:, j], precision=precision,
                preferred_element_type=jnp.float32,
            )
            return acc * correction[..., None] + pv, m_new, l

        # Made from qi so that the loop's carry varies over devices as qi does.
        acc = jnp.moveaxis(jnp.zeros_like(qi, jnp.float32), 1, 3)  # (b, kv, g, block, d)
        init = (acc, acc[..., 0] + _MASKED, acc[..., 0])
        first = 0 if window is None else jnp.maximum(0, (i * block - window + 1) // block)
        acc, _, l = jax.lax.fori_loop(first, i + 1, key_block, init)
        out = acc / l[..., None]  # (b, kv, g, block, d)
        return jnp.moveaxis(out, 3, 1).reshape(b, block, h, d).astype(q.dtype)

    out = jax.lax.map(query_block, jnp.arange(n))  # (n, b, block, h, d)
    return jnp.moveaxis(out, 0, 1).reshape(b, n * block, h, d)[:, :s]


def _window_starts(positions, window):
    """Each row's first visible key with a sliding window (None without)."""
    return None if window is None else jnp.maximum(positions + 1 - window, 0)


def decode_step(q, k_new, v_new, k_cache, v_cache, positions, window=None):
    """One new token per row: writes its key and value into the row's caches
    at its position, then attends its query to the row's keys up to it.

    q: (batch, heads, head_dim); k_new, v_new: (batch, kv_heads, head_dim);
    k_cache, v_cache: (batch, kv_heads, length, head_dim); positions: (batch,)
    int, the new token's. Keys [start, position] are visible: start is 0, or
    with a window the row's last `window` keys. Returns (out, k_cache, v_cache).
    """
    k_new, v_new = k_new.astype(k_cache.dtype), v_new.astype(v_cache.dtype)
    starts = _window_starts(positions, window)
    if decode_attention.applies(q, k_cache):
        return decode_attention.decode_step(q, k_new, v_new, k_cache, v_cache, positions, starts)
    write = jax.vmap(lambda cache, new, p: jax.lax.dynamic_update_slice_in_dim(cache, new[:, None], p, axis=1))
    k_cache, v_cache = write(k_cache, k_new, positions), write(v_cache, v_new, positions)
    b, h, d = q.shape
    kv, t = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(b, kv, h // kv, d)
    precision = product_precision(q, k_cache)
    scores = jnp.einsum("bkgd,bktd->bkgt", qg, k_cache, precision=precision, preferred_element_type=jnp.float32)
    keys = jnp.arange(t)
    visible = keys[None, :] <= positions[:, None]
    if starts is not None:
        visible &= keys[None, :] >= starts[:, None]
    scores = jnp.where(visible[:, None, None], scores * (1.0 / d**0.5), _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkgt,bktd->bkgd", probs, v_cache, precision=precision, preferred_element_type=jnp.float32)
    return out.reshape(b, h, d).astype(q.dtype), k_cache, v_cache


def decode_step_fused(qkv, k_cache, v_cache, positions, window=None):
    """`decode_step` from the fused q/k/v product of one new token per row,
    (batch, kv_heads, 2 + group, head_dim): each kv head's key, value and
    group of queries. The Pallas kernel reads them out of it in place (a
    group of a power of two); elsewhere they are cut out and `decode_step`
    runs. Returns (out (batch, heads, head_dim), k_cache, v_cache)."""
    b, kv, slots, d = qkv.shape
    group = slots - 2
    if decode_attention.applies(qkv, k_cache) and group & (group - 1) == 0:
        starts = _window_starts(positions, window)
        return decode_attention.decode_step_fused(qkv.astype(k_cache.dtype), k_cache, v_cache, positions, starts)
    q = qkv[:, :, 2:].reshape(b, kv * group, d)
    return decode_step(q, qkv[:, :, 0], qkv[:, :, 1], k_cache, v_cache, positions, window)


def _write_pages(k_pages, v_pages, k_new, v_new, tables, positions, valid):
    """Writes new keys and values (rows, width, kv_heads, head_dim) at their
    positions (rows, width) into the pages their rows' tables (rows,
    table_width) name. Tokens not `valid` (rows, width) go to slot 0 of page
    0, a page no sequence owns. Returns (k_pages, v_pages)."""
    page_size = k_pages.shape[2]
    pages = jnp.take_along_axis(tables, jnp.minimum(positions // page_size, tables.shape[1] - 1), axis=1)
    pages = jnp.where(valid, pages, 0).reshape(-1)
    slots = jnp.where(valid, positions % page_size, 0).reshape(-1)
    write = lambda cache, new: cache.at[:, pages, slots].set(
        jnp.swapaxes(new.reshape(-1, *new.shape[2:]), 0, 1).astype(cache.dtype)
    )
    return write(k_pages, k_new), write(v_pages, v_new)


def paged_kernel_applies(dtype, head_dim, k_pages):
    """Whether the Pallas kernels attend `dtype` heads of `head_dim` over
    these pages (they read a row's own pages only, however wide its
    table)."""
    return paged_kernel.applies(jax.ShapeDtypeStruct((1, 1, head_dim), dtype), k_pages)


def paged_attention(qkv, k_pages, v_pages, tables, positions, valid, window=None):
    """Rows' new tokens over a paged cache: writes their keys and values into
    the pages of the rows' tables, then attends each query to its row's keys
    up to it (within the window).

    qkv: the fused q/k/v product (rows, width, kv_heads, 2 + group,
    head_dim): each kv head's key, value and group of queries; positions,
    valid: (rows, width), the tokens' positions and whether each is one (the
    rest, padding, is written where no row reads). Returns (out (rows, width,
    heads, head_dim), k_pages, v_pages)."""
    rows, width, kv, slots, d = qkv.shape
    group = slots - 2
    q = qkv[:, :, :, 2:].reshape(rows, width, kv * group, d)
    # A width of 1 is decode steps, every token valid (padding rows write
    # page 0, which no row reads).
    if width == 1 and paged_kernel.applies(q, k_pages):
        step = qkv[:, 0].astype(k_pages.dtype)
        position = positions[:, 0]
        starts = _window_starts(position, window)
        if group & (group - 1) == 0:
            out, k_pages, v_pages = paged_kernel.paged_decode_step_fused(
                step, k_pages, v_pages, tables, position, starts)
        else:
            q = step[:, :, 2:].reshape(rows, kv * group, d)
            out, k_pages, v_pages = paged_kernel.paged_decode_step(
                q, step[:, :, 0], step[:, :, 1], k_pages, v_pages, tables, position, starts)
        return out[:, None], k_pages, v_pages
    k_pages, v_pages = _write_pages(k_pages, v_pages, qkv[:, :, :, 0], qkv[:, :, :, 1], tables, positions, valid)
    if paged_kernel.applies(q, k_pages):
        out = paged_kernel.paged_chunk_attention(q.astype(k_pages.dtype), k_pages, v_pages, tables, positions[:, 0],
                                                 valid.sum(axis=1), window)
        return out.astype(q.dtype), k_pages, v_pages
    page_size = k_pages.shape[2]
    gather = lambda pages: jnp.moveaxis(pages[:, tables], 0, 3).reshape(rows, -1, kv, d)
    keys = jnp.arange(tables.shape[1] * page_size)
    mask = keys[None, None, :] <= positions[:, :, None]
    if window is not None:
        mask &= positions[:, :, None] - keys[None, None, :] < window
    return dense_attention(q, gather(k_pages), gather(v_pages), mask), k_pages, v_pages
