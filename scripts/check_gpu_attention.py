"""On a GPU: cuDNN's fused attention inside ParallelAttention against the plain
XLA attention, on random bf16 inputs with right padding and a sliding window.

    python scripts/check_gpu_attention.py
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tp_zoo.layers import ParallelAttention  # noqa: E402
from tp_zoo.layers import RotaryEmbedding  # noqa: E402
from tp_zoo.layers import attention as attention_module  # noqa: E402


def main():
    print(jax.devices())
    rs = np.random.RandomState(0)
    x = rs.randn(3, 256, 256).astype("float32")
    mask = np.ones((3, 256), "int32")
    mask[1, 200:] = 0
    mask[2, 17:] = 0
    for window in (None, 64):
        layer = ParallelAttention(8, 32, 256, num_kv_heads=2, rotary=RotaryEmbedding(32), sliding_window=window,
                                  dtype="bfloat16")
        layer.build(x.shape)
        outs = {}
        for fused in (True, False):
            attention_module.FUSED_ATTENTION = fused
            outs[fused] = np.asarray(jax.jit(lambda x, m: layer(x, padding_mask=m))(x, mask), "float32")
        real = mask.astype(bool)
        diff = np.max(np.abs(outs[True][real] - outs[False][real]))
        scale = np.max(np.abs(outs[False][real]))
        print(f"window={window}: fused vs XLA max |diff| {diff:.3e} (max |out| {scale:.3f})")
        assert diff <= 2e-2 * max(1.0, scale), "fused attention disagrees"
    print("fused attention OK")


if __name__ == "__main__":
    main()
