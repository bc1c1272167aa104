"""A decode step's attention and cache write alone: the Pallas kernel (at
several block sizes and split targets) and the XLA path, against the bytes
they must read.

    python scripts/bench_decode_kernel.py
    python scripts/bench_decode_kernel.py paged

Llama-3-8B heads (32 query, 8 kv, head_dim 128), bf16; each row's cache
holds `length` keys (the new one included) in a buffer of `buffer`
positions. Time per call: 32 calls in one compiled loop (one per layer of a
decode step, each query depending on the last output, the caches carried
and written in place), the best of 20 loops after a warm-up; GB/s counts
the keys and values read.

`paged`: the paged decode step (`tp_zoo.kernels.paged_attention`, pages of
16 and 64 shuffled over a pool, at two steps and split targets) beside the
contiguous decode kernel (both write the new key and value), for rows of
1024 keys at batch 1, 16 and 64, and for one such row padded to 16 rows
with tables of 8192 positions, as a serving engine runs a lone request;
with the time the keys and values take to read at an H200's 4.8 TB/s (the
floor).
"""

import itertools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from tp_zoo import kernels
from tp_zoo.kernels import paged_attention
from tp_zoo.layers import attention_ops

CASES = [(1, 4160, 4608), (16, 1088, 1152), (16, 4160, 4608), (1, 32800, 36864)]  # batch, length, buffer


LAYERS = 32


def seconds_per_call(q, k_new, v_new, k, v, positions):
    def layers(q, k, v):
        def step(i, carry):
            q, k, v = carry
            out, k, v = attention_ops.decode_step(q, k_new, v_new, k, v, positions)
            return out, k, v

        return jax.lax.fori_loop(0, LAYERS, step, (q, k, v))

    # Copies of the caches, donated, so that the loop writes them in place as
    # generation does.
    fn = jax.jit(layers, donate_argnums=(1, 2))
    return _best_per_layer(lambda state: fn(q, *state[1:]), (q, jnp.copy(k), jnp.copy(v)))


def _best_per_layer(call, state, repeats=20):
    """The fastest of `repeats` timed `state = call(state)` after one
    untimed, per layer of the LAYERS the call runs."""
    state = jax.block_until_ready(call(state))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        state = jax.block_until_ready(call(state))
        best = min(best, time.perf_counter() - start)
    return best / LAYERS


def decode_inputs(batch, length, buffer, rs):
    """Llama-3-8B's decode step for `batch` rows at position length - 1 of
    caches of `buffer` positions: (q, k_new, v_new, k, v, positions), and the
    bytes of keys and values the step reads."""
    q = jnp.asarray(rs.randn(batch, 32, 128), jnp.bfloat16)
    k_new, v_new = (jnp.asarray(rs.randn(batch, 8, 128), jnp.bfloat16) for _ in range(2))
    k, v = (jnp.asarray(rs.randn(batch, 8, buffer, 128), jnp.bfloat16) for _ in range(2))
    positions = jnp.full((batch,), length - 1, jnp.int32)
    return (q, k_new, v_new, k, v, positions), 2 * batch * 8 * length * 128 * 2


def main():
    rows = []
    for batch, length, buffer in CASES:
        rs = np.random.RandomState(0)
        (q, k_new, v_new, k, v, positions), read = decode_inputs(batch, length, buffer, rs)
        variants = [("xla", None, None, None)] + [
            ("pallas", block, target, warps) for block, target, warps in itertools.product((64, 128), (132, 264, 528), (4, 8))
        ]
        for name, block, target, warps in variants:
            config = (kernels.DecodeAttentionConfig(block=block, target_programs=target, num_warps=warps) if block
                      else kernels.DecodeAttentionConfig(enabled=False))
            with kernels.configured(kernels.KernelConfigs(decode_attention=config)):
                seconds = seconds_per_call(q, k_new, v_new, k, v, positions)
            rows.append((batch, length, name, block, target, warps, seconds * 1e6, read / seconds / 1e9))
            print(rows[-1], flush=True)
    print(f"\ndecode attention and cache write alone; {jax.devices()[0].device_kind}; jax {jax.__version__}")
    print(f"{'batch':>6}{'length':>8}{'path':>8}{'block':>7}{'target':>8}{'warps':>7}{'us':>9}{'GB/s':>8}")
    for batch, length, name, block, target, warps, us, rate in rows:
        print(f"{batch:>6}{length:>8}{name:>8}{str(block):>7}{str(target):>8}{str(warps):>7}{us:>9.1f}{rate:>8.0f}")


H200_BYTES_PER_SECOND = 4.8e12


def seconds_per_paged_call(q, k_new, v_new, k_pages, v_pages, tables, positions):
    """As `seconds_per_call`, for the paged decode step (its pages donated
    and written in place)."""
    def layers(q, k_pages, v_pages):
        def step(i, carry):
            return paged_attention.paged_decode_step(carry[0], k_new, v_new, *carry[1:], tables, positions)

        return jax.lax.fori_loop(0, LAYERS, step, (q, k_pages, v_pages))

    fn = jax.jit(layers, donate_argnums=(1, 2))
    return _best_per_layer(lambda state: fn(q, *state[1:]), (q, k_pages, v_pages))


def paged_main(length=1024, table_width=128):
    """Rows of `length` keys at batch 1, 16 and 64; and one such row among
    15 padding rows (position 0, page 0), as a serving engine pads a lone
    decode, whose tables span `table_width` pages (8192 positions of 64)."""
    rows = []
    for batch, real in ((1, 1), (16, 16), (64, 64), (16, 1)):
        rs = np.random.RandomState(0)
        inputs, read = decode_inputs(real, length, length, rs)
        if real == batch:
            seconds = seconds_per_call(*inputs)
            rows.append((f"{batch}", "decode", None, None, None, seconds, read))
            print(rows[-1], flush=True)
        q, k_new, v_new, positions = (jnp.pad(x, [(0, batch - real)] + [(0, 0)] * (x.ndim - 1))
                                      for x in (inputs[0], inputs[1], inputs[2], inputs[-1]))
        for page_size in (64, 16):
            pages = real * length // page_size
            # Page 0 for the padding rows, the rest shuffled over the rows' tables.
            tables = np.zeros((batch, max(table_width * 64 // page_size, pages // real)), np.int32)
            tables[:real, : pages // real] = 1 + rs.permutation(pages).reshape(real, -1)
            k_pages, v_pages = (jnp.asarray(rs.randn(8, 1 + pages, page_size, 128), jnp.bfloat16) for _ in range(2))
            for block, target in itertools.product((64, 128), (264, 528)):
                config = kernels.PagedAttentionConfig(block=block, target_programs=target)
                with kernels.configured(kernels.KernelConfigs(paged_attention=config)):
                    seconds = seconds_per_paged_call(q, k_new, v_new, k_pages, v_pages, jnp.asarray(tables),
                                                     positions)
                rows.append((f"{real} of {batch}", "paged", page_size, block, target, seconds, read))
                print(rows[-1], flush=True)
    print(f"\ndecode attention of {length}-key rows; {jax.devices()[0].device_kind}; jax {jax.__version__}")
    print(f"{'rows':>9}{'path':>8}{'page':>6}{'block':>7}{'target':>8}{'MB read':>9}{'us':>8}{'floor us':>10}"
          f"{'GB/s':>7}")
    for batch, name, page_size, block, target, seconds, read in rows:
        floor = read / H200_BYTES_PER_SECOND
        print(f"{batch:>9}{name:>8}{str(page_size):>6}{str(block):>7}{str(target):>8}{read / 1e6:>9.1f}"
              f"{seconds * 1e6:>8.1f}{floor * 1e6:>10.1f}{read / seconds / 1e9:>7.0f}")


if __name__ == "__main__":
    if sys.argv[1:] == ["paged"]:
        paged_main()
    else:
        main()
