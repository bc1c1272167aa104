"""The attention computations against plain dense attention (float32).

Blockwise prefill and the XLA decode step must give what the whole score
matrix gives, for GQA, ragged rows, windows and lengths that are not whole
blocks; the Pallas GPU decode kernel, forced by its configuration onto the
CPU (where Pallas' interpreter runs it), must write the caches exactly as the XLA decode step does and give its
output (exactly, where its softmax is one-hot); and the prefill/decode modes
of `ParallelAttention` at tp 2 and 4 must give what its plain call gives on
one device.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import assert_close
from tests.helpers import mesh_scope
from tp_zoo import kernels
from tp_zoo import layers
from tp_zoo.kernels import decode_attention
from tp_zoo.layers import attention_ops


def _qkv(batch, seq, heads, kv_heads, head_dim, seed=0):
    rs = np.random.RandomState(seed)
    return (jnp.asarray(rs.randn(batch, seq, h, head_dim), jnp.float32) for h in (heads, kv_heads, kv_heads))


def _dense_causal(q, k, v, window):
    positions = jnp.arange(q.shape[1])
    return attention_ops.dense_attention(q, k, v, attention_ops.causal_mask(positions, positions, window)[None])


@pytest.mark.parametrize("seq,block,window", [(300, 64, None), (300, 64, 37), (128, 128, None), (70, 512, 9)])
def test_blockwise_matches_dense(seq, block, window):
    q, k, v = _qkv(2, seq, 8, 2, 16)
    ref = _dense_causal(q, k, v, window)
    got = jax.jit(lambda q, k, v: attention_ops.blockwise_attention(q, k, v, window, block=block))(q, k, v)
    assert_close(ref, got, f"blockwise seq={seq} block={block} window={window}")


def _dense_decode(q, k_cache, v_cache, positions, window):
    """Each row alone: its query against keys [start, position] of its cache."""
    out = []
    for row, position in enumerate(np.asarray(positions)):
        start = 0 if window is None else max(0, position + 1 - window)
        k = jnp.swapaxes(k_cache[row : row + 1, :, start : position + 1], 1, 2)
        v = jnp.swapaxes(v_cache[row : row + 1, :, start : position + 1], 1, 2)
        mask = jnp.ones((1, 1, position + 1 - start), bool)
        out.append(attention_ops.dense_attention(q[row : row + 1, None], k, v, mask)[:, 0])
    return jnp.concatenate(out)


def _written(cache, new, positions):
    """`cache` with each row's `new` (batch, kv_heads, head_dim) at its position."""
    cache = np.array(cache)
    cache[np.arange(len(positions)), :, np.asarray(positions)] = new
    return cache


# Rows at the first key, either side of the 64-key block boundaries and of
# the split boundary at key 192 (with 2 splits of 3 blocks), and the last key.
POSITIONS = (0, 63, 64, 191, 192, 319)


def _decode_inputs(heads=8, kv_heads=2, length=320, dtype=jnp.float32):
    rs = np.random.RandomState(1)
    batch = len(POSITIONS)
    q = jnp.asarray(rs.randn(batch, heads, 64), dtype)
    k_new, v_new = (jnp.asarray(rs.randn(batch, kv_heads, 64), dtype) for _ in range(2))
    k, v = (jnp.asarray(rs.randn(batch, kv_heads, length, 64), dtype) for _ in range(2))
    return q, k_new, v_new, k, v, jnp.array(POSITIONS)


def _decode_step(window, *args):
    """attention_ops.decode_step, traced anew (it picks its path when traced)."""
    return jax.jit(lambda *a: attention_ops.decode_step(*a, window))(*args)


def _forced_kernel(target_programs=kernels.DecodeAttentionConfig.target_programs):
    """A block in which the decode step takes the Pallas kernel, run by
    Pallas' interpreter on the CPU, with about `target_programs` programs
    (which sets the splits)."""
    config = kernels.DecodeAttentionConfig(forced=True, interpret=True, target_programs=target_programs)
    return kernels.configured(kernels.KernelConfigs(decode_attention=config))


def _kernel_decode_step(window, *args, target_programs=kernels.DecodeAttentionConfig.target_programs):
    """attention_ops.decode_step through the Pallas kernel (`_forced_kernel`)."""
    q, _, _, k_cache = args[:4]
    with _forced_kernel(target_programs):
        assert decode_attention.applies(q, k_cache)
        return _decode_step(window, *args)


@pytest.mark.parametrize("window", [None, 50])
@pytest.mark.parametrize("kv_heads", [1, 2, 8])
def test_decode_step_matches_dense(window, kv_heads):
    """The XLA path: the new key and value written at each row's position,
    and its query against the row's keys up to it."""
    q, k_new, v_new, k, v, positions = _decode_inputs(kv_heads=kv_heads)
    k_ref, v_ref = _written(k, k_new, positions), _written(v, v_new, positions)
    out, k_got, v_got = _decode_step(window, q, k_new, v_new, k, v, positions)
    np.testing.assert_array_equal(k_got, k_ref)
    np.testing.assert_array_equal(v_got, v_ref)
    assert_close(_dense_decode(q, k_ref, v_ref, positions, window), out, f"XLA decode kv_heads={kv_heads} window={window}")


# Programs per (row, kv head): 1 over all 5 blocks, 2 splits of 3 and 2
# blocks, or a split per block.
@pytest.mark.parametrize(
    "heads,kv_heads,window,target_programs",
    [(8, 2, window, target) for window in (None, 50, 64) for target in (1, 24, 264)]
    + [(12, 2, 50, 24), (32, 1, 50, 24)],
)
def test_decode_kernel_matches_xla(heads, kv_heads, window, target_programs):
    """The Pallas kernel's own logic (the new key and value written into the
    caches and used at their position, splits, blocks outside a row's window
    skipped, query groups of 4, 6 (padded to 8 before the kernel) and 32
    heads repeated to the matrix unit's rows, the merge), run by the Pallas
    interpreter: the caches it writes equal the XLA path's bitwise, its
    output to float32 rounding (the splits' online softmax adds in another
    order)."""
    args = _decode_inputs(heads, kv_heads)
    out, k_cache, v_cache = _decode_step(window, *args)
    got, k_got, v_got = _kernel_decode_step(window, *args, target_programs=target_programs)
    np.testing.assert_array_equal(k_got, k_cache)
    np.testing.assert_array_equal(v_got, v_cache)
    assert_close(out, got, f"Pallas decode window={window} programs={target_programs} heads={heads}/{kv_heads}")


@pytest.mark.parametrize("dtype,window", [(jnp.float32, None), (jnp.float32, 50), (jnp.float32, 64), (jnp.bfloat16, 64)])
@pytest.mark.parametrize("dominant", ["new", "oldest visible"])
def test_decode_kernel_equals_xla_exactly(dtype, window, dominant):
    """Integer inputs where one visible key's score exceeds every other's by
    hundreds (softmax exactly one-hot), and keys with still larger scores at
    the positions each row must not use: its cache row at the new position
    (stale before the write), the keys after it and, with a window, the key
    just before its window. Both paths must then return exactly the
    dominant key's value, at 2 splits of 3 blocks and at a split per block."""
    rs = np.random.RandomState(3)
    batch, heads, kv_heads, length, d = len(POSITIONS), 8, 2, 320, 64
    positions = np.array(POSITIONS)
    starts = positions + 1 - (length if window is None else window)
    sign = rs.choice([-1, 1], (batch, kv_heads, d))
    q = np.repeat(sign, heads // kv_heads, axis=1)  # each group's queries alike
    k = rs.randint(-2, 3, (batch, kv_heads, length, d))  # scores within +-16
    v = rs.randint(-100, 101, (batch, kv_heads, length, d))
    k_new, v_new = rs.randint(-2, 3, (batch, kv_heads, d)), rs.randint(-100, 101, (batch, kv_heads, d))
    rows, first = np.arange(batch), np.maximum(starts, 0)
    if dominant == "new":
        k_new, expected = 64 * sign, v_new
    else:
        k[rows, :, first] = 64 * sign
        first_is_new = (first == positions)[:, None, None]
        k_new = np.where(first_is_new, 64 * sign, k_new)
        expected = np.where(first_is_new, v_new, v[rows, :, first])
    k[rows, :, positions] = 128 * sign  # stale
    future, windowed = positions + 1 < length, starts > 0
    k[rows[future], :, positions[future] + 1] = 128 * sign[future]
    k[rows[windowed], :, starts[windowed] - 1] = 128 * sign[windowed]
    expected = np.repeat(expected, heads // kv_heads, axis=1)
    args = [jnp.asarray(x, dtype) for x in (q, k_new, v_new, k, v)] + [jnp.asarray(positions)]
    xla = _decode_step(window, *args)
    np.testing.assert_array_equal(np.asarray(xla[0], np.float32), expected)
    for target_programs in (24, 264):
        got = _kernel_decode_step(window, *args, target_programs=target_programs)
        for path, kernel in zip(xla, got):
            np.testing.assert_array_equal(np.asarray(kernel, np.float32), np.asarray(path, np.float32))


def test_decode_kernel_applies_only_on_gpu_to_16_bit_whole_blocks():
    """Not on this CPU, unless forced by the configuration in force, and
    then only to caches of its whole blocks (at any dtype and head size)."""
    q = jnp.zeros((1, 8, 128), jnp.bfloat16)
    assert not decode_attention.applies(q, jnp.zeros((1, 2, 256, 128), jnp.bfloat16))
    forced = kernels.DecodeAttentionConfig(forced=True, block=32)
    with kernels.configured(kernels.KernelConfigs(decode_attention=forced)):
        assert decode_attention.cache_length_multiple() == 32
        assert decode_attention.applies(q, jnp.zeros((1, 2, 96, 128), jnp.bfloat16))
        assert decode_attention.applies(q[..., :8].astype(jnp.float32), jnp.zeros((1, 2, 96, 8), jnp.float32))
        assert not decode_attention.applies(q, jnp.zeros((1, 2, 80, 128), jnp.bfloat16))
    disabled = kernels.DecodeAttentionConfig(enabled=False, forced=True)
    with kernels.configured(kernels.KernelConfigs(decode_attention=disabled)):
        assert not decode_attention.applies(q, jnp.zeros((1, 2, 256, 128), jnp.bfloat16))
    assert decode_attention.cache_length_multiple() == kernels.DecodeAttentionConfig.block


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_prefill_then_decode_match_plain_attention(tp):
    """Prefill of 5 tokens, then 3 decode steps at per-row positions, equal the
    plain causal call over all 8 tokens on one device (GQA, kv heads < tp at 4)."""
    rs = np.random.RandomState(2)
    x = rs.randn(2, 8, 32).astype("float32")
    ref_layer = layers.ParallelAttention(8, 4, 32, num_kv_heads=2, rotary=layers.RotaryEmbedding(4))
    ref_layer.build(x.shape)
    ref = np.asarray(ref_layer(x))
    with mesh_scope(tp):
        layer = layers.ParallelAttention(8, 4, 32, num_kv_heads=2, rotary=layers.RotaryEmbedding(4))
        layer.build(x.shape)
        layer.set_weights(ref_layer.get_weights())
        cache = layer.empty_cache(2, 16)
        out, cache = jax.jit(lambda x, m, c: layer(x, padding_mask=m, cache=c))(x[:, :5], np.ones((2, 5), bool), cache)
        assert_close(ref[:, :5], out, f"prefill tp={tp}")
        step = jax.jit(lambda x, p, c: layer(x, cache=c, positions=p))
        for position in range(5, 8):
            out, cache = step(x[:, position : position + 1], jnp.array([position, position]), cache)
            assert_close(ref[:, position : position + 1], out, f"decode at {position} tp={tp}")


@pytest.mark.parametrize("window", [None, 50])
def test_decode_kernel_reads_the_fused_qkv_product_as_the_separate_operands(window):
    """decode_step_fused hands the kernel the fused q/k/v product whole (its
    queries, keys and values read in place by the kernel's block specs): the
    same outputs and caches, bitwise, as the kernel given them separately."""
    q, k_new, v_new, k, v, positions = _decode_inputs(heads=8, kv_heads=2)
    batch, kv = k_new.shape[:2]
    qkv = jnp.concatenate([k_new[:, :, None], v_new[:, :, None], q.reshape(batch, kv, 4, -1)], axis=2)
    separate = _kernel_decode_step(window, q, k_new, v_new, k, v, positions)
    with _forced_kernel():
        assert decode_attention.applies(qkv, k)
        fused = jax.jit(lambda *a: attention_ops.decode_step_fused(*a, window))(qkv, k, v, positions)
    for got, want in zip(fused, separate):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
