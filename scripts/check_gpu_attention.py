"""On a GPU: the fused attention paths against plain XLA attention, in bf16.

    python scripts/check_gpu_attention.py

1. ParallelAttention with cuDNN's fused attention against the dense XLA
   attention (right padding, a sliding window).
2. The prefill's cuDNN attention against the blockwise attention.
3. The Pallas decode step against the XLA one, for ragged row positions
   (0 to the end of the cache) and a window: its output, and the caches it
   writes in place (bitwise).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tp_zoo.layers import ParallelAttention  # noqa: E402
from tp_zoo.layers import RotaryEmbedding  # noqa: E402
from tp_zoo.layers import attention_ops  # noqa: E402
from tp_zoo.kernels import decode_attention as decode_kernel  # noqa: E402


def report(what, got, want, tolerance=2e-2):
    got, want = np.asarray(got, "float32"), np.asarray(want, "float32")
    diff = np.max(np.abs(got - want))
    scale = np.max(np.abs(want))
    print(f"{what}: max |diff| {diff:.3e} (max |ref| {scale:.3f})", flush=True)
    assert diff <= tolerance * max(1.0, scale), f"{what} disagrees"


def check_layer():
    rs = np.random.RandomState(0)
    x = rs.randn(3, 256, 256).astype("float32")
    mask = np.ones((3, 256), "int32")
    mask[1, 200:] = 0
    mask[2, 17:] = 0
    real = mask.astype(bool)
    for window in (None, 64):
        layer = ParallelAttention(8, 32, 256, num_kv_heads=2, rotary=RotaryEmbedding(32), sliding_window=window,
                                  dtype="bfloat16")
        layer.build(x.shape)
        outs = {}
        for fused in (True, False):
            attention_ops.FUSED_ATTENTION = fused
            outs[fused] = np.asarray(jax.jit(lambda x, m: layer(x, padding_mask=m))(x, mask), "float32")
        attention_ops.FUSED_ATTENTION = True
        report(f"layer, window={window}: cuDNN vs XLA", outs[True][real], outs[False][real])


def check_prefill():
    rs = np.random.RandomState(1)
    q, k, v = (jnp.asarray(rs.randn(2, 1000, h, 128), jnp.bfloat16) for h in (32, 8, 8))
    lengths = jnp.array([1000, 1000])
    for window in (None, 300):
        fused = jax.jit(lambda q, k, v: attention_ops.fused_attention(q, k, v, lengths, window))(q, k, v)
        blocks = jax.jit(lambda q, k, v: attention_ops.blockwise_attention(q, k, v, window))(q, k, v)
        report(f"prefill, window={window}: cuDNN vs blockwise", fused, blocks)


def check_decode():
    rs = np.random.RandomState(2)
    b, t = 6, 4096
    q = jnp.asarray(rs.randn(b, 32, 128), jnp.bfloat16)
    k_new, v_new = (jnp.asarray(rs.randn(b, 8, 128), jnp.bfloat16) for _ in range(2))
    k, v = (jnp.asarray(rs.randn(b, 8, t, 128), jnp.bfloat16) for _ in range(2))
    positions = jnp.array([0, 62, 63, 64, 2999, t - 1])
    # A new jit each time: the kernel or the XLA path is chosen when traced.
    step = lambda window: jax.jit(lambda *a: attention_ops.decode_step(*a, window))(q, k_new, v_new, k, v, positions)
    for window in (None, 100):
        decode_kernel.ENABLED = True
        assert decode_kernel.applies(q, k)
        kernel = step(window)
        decode_kernel.ENABLED = False
        xla = step(window)
        decode_kernel.ENABLED = True
        report(f"decode, window={window}: Pallas kernel vs XLA", kernel[0], xla[0])
        report(f"decode, window={window}: caches written by the kernel vs XLA", kernel[1:], xla[1:], tolerance=0)


def main():
    print(jax.devices())
    check_layer()
    check_prefill()
    check_decode()
    print("fused attention OK")


if __name__ == "__main__":
    main()
