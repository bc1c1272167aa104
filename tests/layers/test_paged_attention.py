"""The paged decode kernel (`tp_zoo.kernels.paged_attention`), forced by its
configuration onto the CPU, where Pallas' interpreter runs it, against
dense attention (float64 numpy) over each row's keys gathered from its
pages into a contiguous run, and its writes against the pages expected.

The pages are shuffled among the rows; table entries a row does not use
(past its position, before its window's page) point at page 0, which no row
uses. Every slot no row may use (page 0, spare pages, and the slots of a
row's first and last pages outside its [start, position]) holds keys of
1e4 and NaN values: a key that leaked into the softmax would swamp it, and
a value the kernel read at all, even with its weight masked to 0, would
make the output NaN. So does each row's new position until the kernel
writes the row's new key and value there: it must take them from its
operands, and the pages it returns must hold them (exactly). Tolerance: float32, 1e-5 x max(1, max |reference|)
(the online softmax and the merge of the splits add in other orders);
bf16 inputs (the reference computed from the same bf16 values), 2e-2 x
max(1, max |reference|): the kernel rounds the softmax weights to bf16
(8 bits, ~4e-3 per rounding) for the value product, and its output to bf16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import assert_close
from tests.helpers import mesh_scope
from tp_zoo import kernels
from tp_zoo import parallel
from tp_zoo.kernels import paged_attention

PAGE = 16
WIDTH = 6  # table entries per row: positions 0..95
# (position, start) per row: the first key; the last slot of a page and the
# first of the next; the table's last position; windows starting inside a
# page, at a page's first slot, and at the position itself.
ROWS = ((0, 0), (15, 0), (16, 0), (95, 0), (70, 33), (47, 32), (95, 60), (31, 31))


def _paged_inputs(heads, kv_heads, head_dim, dtype, rows=ROWS, seed=0):
    """(q, k_new, v_new, k_pages, v_pages, tables, positions, starts) for
    `rows`, the new positions' slots poisoned, and the (k, v) pages the
    kernel should return."""
    rs = np.random.RandomState(seed)
    positions, starts = (np.array(x, np.int32) for x in zip(*rows))
    spans = [range(start // PAGE, position // PAGE + 1) for position, start in rows]
    used = sum(len(span) for span in spans)
    num_pages = used + 3  # page 0 and two spare pages no row uses
    ids = iter(rs.permutation(np.arange(1, num_pages))[:used])
    tables = np.zeros((len(rows), WIDTH), np.int32)
    readable = np.zeros((num_pages, PAGE), bool)
    for row, span in enumerate(spans):
        tables[row, list(span)] = [next(ids) for _ in span]
        keys = np.arange(starts[row], positions[row] + 1)
        readable[tables[row, keys // PAGE], keys % PAGE] = True
    k, v = (rs.randn(kv_heads, num_pages, PAGE, head_dim) for _ in range(2))
    k[:, ~readable] = 1e4
    v[:, ~readable] = np.nan
    new_at = (tables[np.arange(len(rows)), positions // PAGE], positions % PAGE)
    k_new, v_new = (np.swapaxes(pages[:, new_at[0], new_at[1]], 0, 1) for pages in (k, v))
    k_given, v_given = k.copy(), v.copy()
    k_given[:, new_at[0], new_at[1]] = 1e4
    v_given[:, new_at[0], new_at[1]] = np.nan
    q = rs.randn(len(rows), heads, head_dim)
    arrays = (jnp.asarray(x, dtype) for x in (q, k_new, v_new, k_given, v_given))
    written = tuple(np.asarray(jnp.asarray(x, dtype)) for x in (k, v))
    return tuple(arrays) + tuple(map(jnp.asarray, (tables, positions, starts))), written


def _dense(q, k_pages, v_pages, tables, positions, starts):
    """Each row's query heads against its keys [start, position], gathered
    from its pages, in float64."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    group = q.shape[1] // k_pages.shape[0]
    out = np.zeros(q.shape)
    for row, (position, start) in enumerate(zip(np.asarray(positions), np.asarray(starts))):
        keys = np.arange(start, position + 1)
        pages, slots = np.asarray(tables)[row, keys // PAGE], keys % PAGE
        k = np.repeat(k_pages[:, pages, slots], group, axis=0)  # (heads, keys, head_dim)
        v = np.repeat(v_pages[:, pages, slots], group, axis=0)
        scores = np.einsum("hd,hkd->hk", q[row], k) / np.sqrt(q.shape[-1])
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out[row] = np.einsum("hk,hkd->hd", weights / weights.sum(axis=-1, keepdims=True), v)
    return out


def _kernel(q, k_new, v_new, *rest):
    """The kernel, traced anew (it reads the configuration in force when
    traced, which is no part of jit's cache key): from the fused q/k/v
    product where the group is a power of two, from separate operands
    otherwise."""
    kv, group = k_new.shape[1], q.shape[1] // k_new.shape[1]
    if group & (group - 1):
        return jax.jit(paged_attention.paged_decode_step)(q, k_new, v_new, *rest)
    qkv = jnp.concatenate([k_new[:, :, None], v_new[:, :, None], q.reshape(q.shape[0], kv, group, -1)], axis=2)
    return jax.jit(paged_attention.paged_decode_step_fused)(qkv, *rest)


def _forced(target_programs=kernels.PagedAttentionConfig.target_programs, block=kernels.PagedAttentionConfig.block):
    """A block in which the kernel applies anywhere, run by Pallas'
    interpreter, with about `target_programs` programs (which sets the
    splits) and `block` keys per loop step."""
    config = kernels.PagedAttentionConfig(forced=True, interpret=True, target_programs=target_programs, block=block)
    return kernels.configured(kernels.KernelConfigs(paged_attention=config))


# 8 rows x 2 kv heads: target 1 gives one split of a row's pages, 24 two
# runs (a 1-page row's second empty), 264 six (the table's width; a row of
# 1-3 pages leaves runs empty); `block` 64 steps over 4 pages at a time (a
# run's last step past its pages), 32 over 2, 16 over 1.
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,target_programs,block,dtype",
    [
        (8, 2, 32, 264, 64, jnp.float32),
        (8, 2, 32, 24, 64, jnp.float32),
        (8, 2, 32, 1, 32, jnp.float32),
        (8, 2, 32, 24, 16, jnp.float32),
        (4, 4, 16, 24, 64, jnp.float32),
        (12, 2, 64, 24, 32, jnp.float32),
        (12, 2, 32, 1, 64, jnp.bfloat16),
        (8, 2, 64, 264, 16, jnp.bfloat16),
    ],
)
def test_paged_kernel_matches_dense(heads, kv_heads, head_dim, target_programs, block, dtype):
    """Ragged positions and windows, shuffled tables, query groups of 1 and
    4 (the fused q/k/v operand) and 6 (separate operands, padded to 8),
    splits, whole and partial steps; each row's new key and value written
    into its page, nothing else touched."""
    args, written = _paged_inputs(heads, kv_heads, head_dim, dtype)
    q, pages, rest = args[0], written, args[5:]
    with _forced(target_programs, block):
        assert paged_attention.applies(q, args[3])
        got, *got_pages = _kernel(*args)
    assert got.shape == q.shape and got.dtype == dtype
    rel = 1e-5 if dtype == jnp.float32 else 2e-2
    what = f"paged kernel heads={heads}/{kv_heads} programs={target_programs} block={block} {dtype.__name__}"
    assert_close(_dense(q, *pages, *rest), np.asarray(got, np.float64), what, rel=rel)
    for got_page, want in zip(got_pages, pages):
        np.testing.assert_array_equal(np.asarray(got_page), want, err_msg=f"{what}: pages written")


def test_paged_kernel_without_starts_and_in_a_sharded_region():
    """starts None reads from position 0; inside shard_map at tp 2, with
    the pages split over their kv heads and the queries over theirs, each
    device's kernel sees its local kv heads, gives the same output (to
    float32 rounding) and writes the same pages."""
    args, written = _paged_inputs(8, 2, 32, jnp.float32, [(p, 0) for p, _ in ROWS])
    q, k_new, v_new, k, v, tables, positions, starts = args
    heads, pages = (None, parallel.MODEL, None), (parallel.MODEL, None, None, None)
    with _forced():
        whole = _kernel(q, k_new, v_new, k, v, tables, positions)
        with mesh_scope(2):
            sharded = jax.jit(
                lambda *a: parallel.run_sharded(
                    parallel.active_mesh(), paged_attention.paged_decode_step,
                    (heads, heads, heads, pages, pages, (None, None), (None,)), (heads, pages, pages), *a,
                )
            )(q, k_new, v_new, k, v, tables, positions)
    assert_close(_dense(q, *written, tables, positions, starts), whole[0], "paged kernel, starts None")
    assert_close(whole[0], sharded[0], "paged kernel at tp 2")
    for got, want in zip(sharded[1:], written):
        np.testing.assert_array_equal(np.asarray(got), want, err_msg="paged kernel at tp 2: pages written")


def test_paged_kernel_applies_only_on_gpu_to_pages_of_a_power_of_two():
    """Not on this CPU unless forced (then at any dtype and head size), and
    only for pages of a power of two >= 16 positions."""
    q = jnp.zeros((1, 8, 128), jnp.bfloat16)
    pages = lambda size, d=128, dtype=jnp.bfloat16: jnp.zeros((2, 4, size, d), dtype)
    assert not paged_attention.applies(q, pages(64))
    with _forced():
        for size in (16, 32, 64, 256):
            assert paged_attention.applies(q, pages(size))
        for size in (8, 48, 96):
            assert not paged_attention.applies(q, pages(size))
        assert paged_attention.applies(q[..., :8].astype(jnp.float32), pages(16, 8, jnp.float32))
    disabled = kernels.PagedAttentionConfig(enabled=False, forced=True)
    with kernels.configured(kernels.KernelConfigs(paged_attention=disabled)):
        assert not paged_attention.applies(q, pages(64))


# (start, count) per row of a chunk of width 8 over tables of 6 pages of 16:
# from position 0, across a page boundary, ending the table, a lone token,
# and one of padding only past its first token.
CHUNKS = ((0, 8), (12, 8), (88, 8), (40, 1), (30, 3))


def _chunk_inputs(heads, kv_heads, head_dim, dtype, seed=1):
    """q (rows, 8, heads, head_dim), pages with every row's keys written,
    tables, starts, counts. Slots no row may read hold keys of 1e4 and NaN
    values, as in `_paged_inputs`."""
    rs = np.random.RandomState(seed)
    starts, counts = (np.array(x, np.int32) for x in zip(*CHUNKS))
    spans = [range(0, (start + count - 1) // PAGE + 1) for start, count in CHUNKS]
    num_pages = sum(map(len, spans)) + 2
    ids = iter(rs.permutation(np.arange(1, num_pages)))
    tables = np.zeros((len(CHUNKS), WIDTH), np.int32)
    readable = np.zeros((num_pages, PAGE), bool)
    for row, span in enumerate(spans):
        tables[row, list(span)] = [next(ids) for _ in span]
        keys = np.arange(starts[row] + counts[row])
        readable[tables[row, keys // PAGE], keys % PAGE] = True
    k, v = (rs.randn(kv_heads, num_pages, PAGE, head_dim) for _ in range(2))
    k[:, ~readable] = 1e4
    v[:, ~readable] = np.nan
    q = rs.randn(len(CHUNKS), 8, heads, head_dim)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v)) + tuple(map(jnp.asarray, (tables, starts, counts)))


def _dense_chunks(q, k_pages, v_pages, tables, starts, counts, window):
    """Each valid token's query heads against its row's keys up to its
    position (within the window), float64; padding tokens zero."""
    q = np.asarray(q, np.float64)
    out = np.zeros(q.shape)
    for row, (start, count) in enumerate(zip(np.asarray(starts), np.asarray(counts))):
        for t in range(count):
            position = start + t
            first = max(0, position + 1 - window) if window else 0
            out[row, t] = _dense(q[row, t][None], k_pages, v_pages, np.asarray(tables)[row][None],
                                 np.array([position]), np.array([first]))[0]
    return out


@pytest.mark.parametrize("heads,kv_heads,window,chunk_query_rows,block,dtype", [
    (8, 2, None, 128, 64, jnp.float32),
    (8, 2, 5, 16, 16, jnp.float32),
    (12, 2, None, 32, 32, jnp.float32),
    (8, 2, 20, 128, 16, jnp.bfloat16),
])
def test_paged_chunk_kernel_matches_dense(heads, kv_heads, window, chunk_query_rows, block, dtype):
    """Chunks from position 0 and later, across pages, ending the table, of
    1 and 3 tokens (the rest padding), windows within and across pages;
    query groups of 4 and 6 (padded to 8), blocks of all 8 tokens, of 2 and
    4, steps over 1 to 4 pages."""
    args = _chunk_inputs(heads, kv_heads, 32, dtype)
    config = kernels.PagedAttentionConfig(forced=True, interpret=True, chunk_query_rows=chunk_query_rows,
                                          block=block)
    with kernels.configured(kernels.KernelConfigs(paged_attention=config)):
        got = jax.jit(lambda *a: paged_attention.paged_chunk_attention(*a, window=window))(*args)
    assert got.shape == args[0].shape and got.dtype == dtype
    rel = 1e-5 if dtype == jnp.float32 else 2e-2
    what = f"paged chunk kernel heads={heads}/{kv_heads} window={window} rows={chunk_query_rows} {dtype.__name__}"
    assert_close(_dense_chunks(*args, window), np.asarray(got, np.float64), what, rel=rel)
