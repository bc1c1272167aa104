"""On an NVIDIA GPU: the compiled kernels and cuDNN's attention against the
XLA paths, in bf16.

1. ParallelAttention with cuDNN's fused attention against the dense XLA
   attention (right padding, a sliding window).
2. The prefill's cuDNN attention against the blockwise attention.
3. The Pallas decode step against the XLA one, for ragged row positions
   (0 to the end of the cache) and a window: its output, and the caches it
   writes in place (bitwise); and from the fused q/k/v product.
4. The Pallas paged decode step against dense float32 attention over each
   row's pages gathered into a contiguous cache (ragged positions, a
   window, shuffled tables, unused entries at a page of NaN values), and
   the keys and values it writes (bitwise); its prompts' chunks kernel
   against the same attention for each token of a chunk.
5. The Pallas int8 product against XLA's.

Tolerance, where not bitwise: max |diff| <= 2e-2 x max(1, max |reference|)
(bf16 keeps 8 bits, ~4e-3 per rounding, and the paths add in other
orders); the int8 products, float32 sums of exact bf16 x int8 products:
1e-5 x max |reference|.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import assert_close
from tp_zoo import kernels
from tp_zoo.kernels import decode_attention
from tp_zoo.kernels import int8_matmul
from tp_zoo.kernels import paged_attention
from tp_zoo.layers import ParallelAttention
from tp_zoo.layers import RotaryEmbedding
from tp_zoo.layers import attention_ops

pytestmark = pytest.mark.gpu

BF16 = 2e-2
XLA_DECODE = kernels.KernelConfigs(decode_attention=kernels.DecodeAttentionConfig(enabled=False))


@pytest.mark.parametrize("window", [None, 64])
def test_layer_with_cudnn_attention_matches_xla(monkeypatch, window):
    rs = np.random.RandomState(0)
    x = rs.randn(3, 256, 256).astype("float32")
    mask = np.ones((3, 256), "int32")
    mask[1, 200:] = 0
    mask[2, 17:] = 0
    real = mask.astype(bool)
    layer = ParallelAttention(8, 32, 256, num_kv_heads=2, rotary=RotaryEmbedding(32), sliding_window=window,
                              dtype="bfloat16")
    layer.build(x.shape)
    outs = {}
    for fused in (True, False):
        monkeypatch.setattr(attention_ops, "FUSED_ATTENTION", fused)
        # A new jit each time: cuDNN or XLA is chosen when traced.
        outs[fused] = np.asarray(jax.jit(lambda x, m: layer(x, padding_mask=m))(x, mask), "float32")
    assert_close(outs[False][real], outs[True][real], f"layer, window={window}: cuDNN vs XLA", rel=BF16)


@pytest.mark.parametrize("window", [None, 300])
def test_prefill_cudnn_attention_matches_blockwise(window):
    rs = np.random.RandomState(1)
    q, k, v = (jnp.asarray(rs.randn(2, 1000, h, 128), jnp.bfloat16) for h in (32, 8, 8))
    lengths = jnp.array([1000, 1000])
    assert attention_ops.fused_applies(q)
    fused = jax.jit(lambda q, k, v: attention_ops.fused_attention(q, k, v, lengths, window))(q, k, v)
    blocks = jax.jit(lambda q, k, v: attention_ops.blockwise_attention(q, k, v, window))(q, k, v)
    assert_close(np.asarray(blocks, "float32"), np.asarray(fused, "float32"),
                 f"prefill, window={window}: cuDNN vs blockwise", rel=BF16)


def _decode_inputs():
    """Llama-3-8B heads (32 over 8, head_dim 128), rows at the first key,
    either side of the first block boundary, inside and at the end of a
    4096-key cache."""
    rs = np.random.RandomState(2)
    b, t = 6, 4096
    q = jnp.asarray(rs.randn(b, 32, 128), jnp.bfloat16)
    k_new, v_new = (jnp.asarray(rs.randn(b, 8, 128), jnp.bfloat16) for _ in range(2))
    k, v = (jnp.asarray(rs.randn(b, 8, t, 128), jnp.bfloat16) for _ in range(2))
    return q, k_new, v_new, k, v, jnp.array([0, 62, 63, 64, 2999, t - 1])


def _float32(arrays):
    return [np.asarray(a, "float32") for a in arrays]


@pytest.mark.parametrize("window", [None, 100])
def test_decode_kernel_matches_xla(window):
    q, k_new, v_new, k, v, positions = _decode_inputs()
    # A new jit each time: the kernel or the XLA path is chosen when traced.
    step = lambda: jax.jit(lambda *a: attention_ops.decode_step(*a, window))(q, k_new, v_new, k, v, positions)
    assert decode_attention.applies(q, k)
    kernel = _float32(step())
    with kernels.configured(XLA_DECODE):
        assert not decode_attention.applies(q, k)
        xla = _float32(step())
    assert_close(xla[0], kernel[0], f"decode, window={window}: Pallas kernel vs XLA", rel=BF16)
    for written, expected in zip(kernel[1:], xla[1:]):
        np.testing.assert_array_equal(written, expected)


@pytest.mark.parametrize("window", [None, 100])
def test_decode_kernel_reads_the_fused_qkv_product(window):
    """decode_step_fused, its operands read out of the fused product by the
    kernel, against the XLA decode step of the same q, k and v."""
    q, k_new, v_new, k, v, positions = _decode_inputs()
    qkv = jnp.concatenate([k_new[:, :, None], v_new[:, :, None], q.reshape(6, 8, 4, 128)], axis=2)
    assert decode_attention.applies(qkv, k)
    fused = _float32(jax.jit(lambda *a: attention_ops.decode_step_fused(*a, window))(qkv, k, v, positions))
    with kernels.configured(XLA_DECODE):
        xla = _float32(jax.jit(lambda *a: attention_ops.decode_step(*a, window))(q, k_new, v_new, k, v, positions))
    assert_close(xla[0], fused[0], f"fused decode, window={window}: Pallas kernel vs XLA", rel=BF16)
    for written, expected in zip(fused[1:], xla[1:]):
        np.testing.assert_array_equal(written, expected)


def _paged_inputs(page_size):
    """Llama-3-8B heads over a shuffled pool of pages: rows at the first key,
    either side of a 64-key boundary, inside, and at the end of a
    2048-position table, the last with a window from 900. Table entries a
    row does not use point at page 0, which no row uses and whose keys and
    values are NaN: read, they would make the output NaN. Each row's new
    position holds NaN too until the kernel writes its new key and value
    there. Returns the kernel's arguments (its fused q/k/v operand first)
    and the pages it should return."""
    rs = np.random.RandomState(4)
    positions, starts = np.array([0, 63, 64, 1337, 2047]), np.array([0, 0, 0, 0, 900])
    spans = [np.arange(start // page_size, position // page_size + 1) for position, start in zip(positions, starts)]
    num_pages = 1 + sum(map(len, spans)) + 7  # 7 spare pages
    ids = iter(rs.permutation(np.arange(1, num_pages)))
    tables = np.zeros((len(positions), 2048 // page_size), np.int32)
    for row, span in enumerate(spans):
        tables[row, span] = [next(ids) for _ in span]
    k, v = (np.array(jnp.asarray(rs.randn(8, num_pages, page_size, 128), jnp.bfloat16)) for _ in range(2))
    k[:, 0] = v[:, 0] = np.nan
    new_at = (tables[np.arange(len(positions)), positions // page_size], positions % page_size)
    new = [np.swapaxes(pages[:, new_at[0], new_at[1]], 0, 1)[:, :, None] for pages in (k, v)]
    q = np.array(jnp.asarray(rs.randn(len(positions), 8, 4, 128), jnp.bfloat16))
    given = [pages.copy() for pages in (k, v)]
    for pages in given:
        pages[:, new_at[0], new_at[1]] = np.nan
    qkv = jnp.asarray(np.concatenate(new + [q], axis=2))
    arrays = [qkv] + [jnp.asarray(x) for x in given]
    return arrays + [jnp.asarray(x, jnp.int32) for x in (tables, positions, starts)], (k, v)


def _paged_reference(qkv, k_pages, v_pages, tables, positions, starts):
    """Dense float32 attention over each row's pages gathered in table order
    into a contiguous cache: keys outside [start, position] masked, their
    values zeroed (page 0's NaNs among them)."""
    b, kv, _, d = qkv.shape
    contiguous = lambda pages: jnp.moveaxis(pages[:, tables], 0, 1).reshape(b, kv, -1, d).astype(jnp.float32)
    k, v = contiguous(k_pages), contiguous(v_pages)
    keys = jnp.arange(k.shape[2])
    visible = (keys >= starts[:, None]) & (keys <= positions[:, None])
    v = jnp.where(visible[:, None, :, None], v, 0)
    qg = qkv[:, :, 2:].astype(jnp.float32)
    scores = jnp.einsum("bkgd,bktd->bkgt", qg, k, precision="highest") / d**0.5
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    out = jnp.einsum("bkgt,bktd->bkgd", jax.nn.softmax(scores, axis=-1), v, precision="highest")
    return out.reshape(b, -1, d)


@pytest.mark.parametrize("page_size", [64, 16])
def test_paged_kernel_matches_dense(page_size):
    """Pages of 64 (a page per loop step) and of 16 (4 pages per step); the
    fused q/k/v operand of a group of 4; each row's new key and value
    written, nothing else touched."""
    args, written = _paged_inputs(page_size)
    assert paged_attention.applies(args[0], args[1])
    got, *got_pages = jax.jit(paged_attention.paged_decode_step_fused)(*args)
    want = jax.jit(_paged_reference)(args[0], *map(jnp.asarray, written), *args[3:])
    assert_close(np.asarray(want), np.asarray(got, "float32"), f"paged decode, pages of {page_size}", rel=BF16)
    for got_page, want_page in zip(got_pages, written):
        np.testing.assert_array_equal(np.asarray(got_page, "float32"), want_page.astype("float32"))


def test_paged_chunk_kernel_matches_dense():
    """Prompts' chunks of Llama-3-8B heads over pages of 64 with tables of
    8192 positions, as the engine runs them: a 256-token chunk from position
    0, one from 1000 of 100 tokens (the rest padding), and one from 4000
    with a 700-key window; against dense float32 attention over each row's
    pages gathered (causal, padding tokens zero)."""
    rs = np.random.RandomState(5)
    starts, counts, page = np.array([0, 1000, 4000]), np.array([256, 100, 256]), 64
    spans = [np.arange((start + count - 1) // page + 1) for start, count in zip(starts, counts)]
    num_pages = 1 + sum(map(len, spans))
    ids = iter(rs.permutation(np.arange(1, num_pages)))
    tables = np.zeros((3, 8192 // page), np.int32)
    for row, span in enumerate(spans):
        tables[row, span] = [next(ids) for _ in span]
    k, v = (jnp.asarray(rs.randn(8, num_pages, page, 128), jnp.bfloat16) for _ in range(2))
    q = jnp.asarray(rs.randn(3, 256, 32, 128), jnp.bfloat16)
    tables, starts, counts = (jnp.asarray(x, jnp.int32) for x in (tables, starts, counts))

    def reference(q, k, v, tables, starts, counts, window):
        keys = lambda pages: jnp.moveaxis(pages[:, tables], 0, 1).reshape(3, 8, -1, 128).astype(jnp.float32)
        positions = starts[:, None] + jnp.arange(256)[None, :]
        key = jnp.arange(tables.shape[1] * page)
        visible = key[None, None, :] <= positions[:, :, None]
        if window:
            visible &= key[None, None, :] > positions[:, :, None] - window
        qg = q.astype(jnp.float32).reshape(3, 256, 8, 4, 128)
        scores = jnp.einsum("bskgd,bktd->bkgst", qg, keys(k), precision="highest") / 128**0.5
        scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
        out = jnp.einsum("bkgst,bktd->bskgd", jax.nn.softmax(scores, axis=-1), keys(v), precision="highest")
        valid = jnp.arange(256)[None, :] < counts[:, None]
        return jnp.where(valid[:, :, None, None, None], out, 0).reshape(3, 256, 32, 128)

    for window in (None, 700):
        got = jax.jit(lambda *a: paged_attention.paged_chunk_attention(*a, window=window))(
            q, k, v, tables, starts, counts)
        want = jax.jit(lambda *a: reference(*a, window))(q, k, v, tables, starts, counts)
        assert_close(np.asarray(want), np.asarray(got, "float32"), f"paged chunk, window {window}", rel=BF16)


@pytest.mark.parametrize("rows", [1, 16, 64])
def test_int8_kernel_matches_xla(rows):
    """x times a Llama-3-8B layer's fused gate/up int8 values (output-major,
    28672 x 4096), as XLA computes it: int8 -> bf16, float32 products."""
    rs = np.random.RandomState(3)
    values = jnp.asarray(rs.randint(-127, 128, (28672, 4096)), jnp.int8)
    x = jnp.asarray(rs.standard_normal((rows, 4096)), jnp.bfloat16)
    assert int8_matmul.applies(x, values)
    got = jax.jit(int8_matmul.int8_matmul)(x, values)
    want = jnp.dot(x, values.T.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    assert float(jnp.abs(want).max()) > 1  # so the bound below is 1e-5 x max |reference|
    assert_close(want, got, f"int8 product, {rows} rows: Pallas kernel vs XLA", rel=1e-5)
