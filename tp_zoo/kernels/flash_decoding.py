"""What the decode attention kernels share (flash-decoding): a row's keys
cut into splits, one program per (row, kv head, split), each with its
group of query heads repeated to the rows a GPU matrix unit takes, and the
splits' partial softmax results merged outside the kernel."""

import jax.numpy as jnp
from jax.experimental import pallas as pl

# The smallest tile of rows a GPU matrix unit takes.
MIN_ROWS = 16
MASKED = -1e30

# The block of one row of a (batch,) array, on a (row, kv head, split) grid.
PER_ROW = pl.BlockSpec((None,), lambda i, j, s: (i,))


def per_split(*shape):
    """The block of one (row, kv head, split) of a (batch, kv_heads, splits, *shape) array."""
    return pl.BlockSpec((None, None, None, *shape), lambda i, j, s: (i, j, s) + (0,) * len(shape))


def per_head(*shape):
    """The block of one (row, kv head) of a (batch, kv_heads, *shape) array."""
    return pl.BlockSpec((None, None, *shape), lambda i, j, s: (i, j) + (0,) * len(shape))


def fused_operands(qkv):
    """The (array, BlockSpec) pairs that read a decode step's queries, new
    keys and new values in place out of the fused q/k/v product (batch,
    kv_heads, 2 + group, head_dim): each kv head's key, value, then its group
    of queries (a power of two of them, a block a kernel loads). Returns
    (queries, keys, values), group."""
    b, kv, slots, d = qkv.shape
    group = slots - 2
    slot = lambda block, start: pl.BlockSpec((None, None, block, d), lambda i, j, s: (i, j, start, 0))
    return ((qkv, slot(pl.Element(group), 2)), (qkv, slot(None, 0)), (qkv, slot(None, 1))), group


def separate_operands(q, k_new, v_new, kv_heads):
    """The (array, BlockSpec) pairs of a decode step's queries (batch, heads,
    head_dim), grouped by kv head and padded (`grouped_queries`), new keys
    and new values (batch, kv_heads, head_dim). Returns (queries, keys,
    values), group, group block."""
    d = q.shape[-1]
    qg, group, group_block = grouped_queries(q, kv_heads)
    return ((qg, per_head(group_block, d)), (k_new, per_head(d)), (v_new, per_head(d))), group, group_block


def grouped_queries(q, kv_heads):
    """(batch, heads, d) queries as (batch, kv_heads, group block, d), the
    group padded to a power of two (a block a kernel loads must be one
    long); returns (queries, group, group block)."""
    b, h, d = q.shape
    group = h // kv_heads
    group_block = pl.next_power_of_2(group)
    qg = q.reshape(b, kv_heads, group, d)
    if group_block != group:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, group_block - group), (0, 0)))
    return qg, group, group_block


def splits(blocks, rows_and_heads, target_programs):
    """(splits, blocks per split) of `blocks` blocks of keys: enough splits
    for about `target_programs` programs over `rows_and_heads` (row, kv
    head) pairs, each split of whole blocks."""
    count = min(blocks, max(1, -(-target_programs // rows_and_heads)))
    per_split_blocks = -(-blocks // count)
    return -(-blocks // per_split_blocks), per_split_blocks


def merge(acc, m, l):
    """The splits' partial results (acc (b, kv, splits, rows, d), running
    max m and sum l (b, kv, splits, rows)) rescaled to their common max and
    normalised: (b, kv, rows, d)."""
    m_max = m.max(axis=2, keepdims=True)
    weight = jnp.exp(m - m_max)
    total = (l * weight).sum(axis=2)
    return (acc * weight[..., None]).sum(axis=2) / total[..., None]
