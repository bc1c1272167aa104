"""The attention computations against plain dense attention (float32).

Blockwise prefill and both decode paths (the XLA one, and the Pallas GPU
kernel run by Pallas' interpreter on the CPU) must give what the whole score
matrix gives, for GQA, ragged rows, windows and lengths that are not whole
blocks; and the prefill/decode modes of `ParallelAttention` at tp 2 and 4 must
give what its plain call gives on one device.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import assert_close
from tests.helpers import mesh_scope
from tp_zoo import layers
from tp_zoo.layers import attention_ops
from tp_zoo.layers import decode_kernel


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


def _dense_decode(q, k_cache, v_cache, lengths, window):
    """Each row alone: its query against keys [start, length) of its cache."""
    out = []
    for row, length in enumerate(np.asarray(lengths)):
        start = 0 if window is None else max(0, length - window)
        k = jnp.swapaxes(k_cache[row : row + 1, :, start:length], 1, 2)
        v = jnp.swapaxes(v_cache[row : row + 1, :, start:length], 1, 2)
        mask = jnp.ones((1, 1, length - start), bool)
        out.append(attention_ops.dense_attention(q[row : row + 1, None], k, v, mask)[:, 0])
    return jnp.concatenate(out)


def _decode_inputs(kv_heads=2, length=320):
    rs = np.random.RandomState(1)
    q = jnp.asarray(rs.randn(4, 8, 64), jnp.float32)
    k, v = (jnp.asarray(rs.randn(4, kv_heads, length, 64), jnp.float32) for _ in range(2))
    return q, k, v, jnp.array([1, 64, 65, length])


@pytest.mark.parametrize("window", [None, 50])
@pytest.mark.parametrize("kv_heads", [1, 2, 8])
def test_decode_attention_matches_dense(window, kv_heads):
    q, k, v, lengths = _decode_inputs(kv_heads)
    ref = _dense_decode(q, k, v, lengths, window)
    got = jax.jit(lambda *a: attention_ops.decode_attention(*a, window))(q, k, v, lengths)
    assert_close(ref, got, f"XLA decode kv_heads={kv_heads} window={window}")


@pytest.mark.parametrize("window", [None, 50])
def test_decode_kernel_matches_dense(window):
    """The Pallas kernel's own logic (splits, blocks past a row's length
    skipped, the merge), run by the Pallas interpreter."""
    q, k, v, lengths = _decode_inputs()
    starts = None if window is None else jnp.maximum(lengths - window, 0)
    ref = _dense_decode(q, k, v, lengths, window)
    got = decode_kernel.decode_attention(q, k, v, lengths, starts, interpret=True)
    assert_close(ref, got, f"Pallas decode window={window}")


def test_decode_kernel_applies_only_on_gpu_to_16_bit_whole_blocks():
    q = jnp.zeros((1, 8, 128), jnp.bfloat16)
    assert not decode_kernel.applies(q, jnp.zeros((1, 2, 256, 128), jnp.bfloat16))  # CPU here


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
