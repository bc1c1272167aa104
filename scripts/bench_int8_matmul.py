"""The int8 product of a decode step alone: x (1 or 16 rows, bf16) times
every int8 kernel of some Llama-3-8B layers, XLA's way beside the Pallas
kernel's (a sweep of its block sizes, split target and warps), each beside
the floor (int8 bytes / --bandwidth) and beside bf16 kernels of the same
shapes.

    python scripts/bench_int8_matmul.py [--layers 8]

Each figure is one compiled program running all the products of --layers
layers (no L2 reuse: every layer has its own kernels), best of 20 calls.
The table comes last.
"""

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import header  # noqa: E402
from bench_common import jax  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tp_zoo.layers import int8_matmul_kernel as kernel  # noqa: E402
from tp_zoo.layers import quantize as q8  # noqa: E402

# (K, N) of one Llama-3-8B layer's kernels: q, k, v, o, gate, up, down.
LAYER = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336), (14336, 4096)]
SWEEP = dict(BLOCK_N=(64, 128, 256), BLOCK_K=(64, 128, 256), NUM_WARPS=(4, 8), TARGET_PROGRAMS=(264, 528))


def best_time(f, *args, repeats=20):
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - start)
    return best


def all_products(product):
    def run(x, kernels):
        return sum(product(x[:, :w.shape[0]], w).sum() for w in kernels)

    return jax.jit(run)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s for the floor")
    args = parser.parse_args()
    rs = np.random.RandomState(0)
    shapes = LAYER * args.layers
    int8 = [jnp.asarray(rs.randint(-127, 128, s), jnp.int8) for s in shapes]
    bf16 = [w.astype(jnp.bfloat16) for w in int8]
    n_bytes = sum(w.size for w in int8)
    shipped = {attr: getattr(kernel, attr) for attr in SWEEP}
    results = []
    for rows in (1, 16):
        x = jnp.asarray(rs.standard_normal((rows, 14336)), jnp.bfloat16)
        floor = n_bytes / args.bandwidth
        cases = [
            ("bf16 kernels (2 bytes each)", all_products(lambda x, w: jnp.dot(x, w)), bf16, 2 * floor),
            ("XLA: int8 -> bf16, f32 out", all_products(
                lambda x, w: jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)), int8, floor),
            ("XLA: int8 -> bf16, bf16 out", all_products(lambda x, w: jnp.dot(x, w.astype(x.dtype))), int8, floor),
        ]
        for name, f, ws, fl in cases:
            t = best_time(f, x, ws)
            results.append((rows, name, t, fl))
            print(f"rows {rows} {name}: {t * 1e6:.1f} us ({t / fl:.2f}x its floor)", flush=True)
        for values in itertools.product(*SWEEP.values()):
            for attr, value in zip(SWEEP, values):
                setattr(kernel, attr, value)
            name = "Pallas " + " ".join(f"{k.lower()}={v}" for k, v in zip(SWEEP, values))
            try:
                t = best_time(all_products(kernel.int8_matmul), x, int8)
            except Exception as e:  # a config Triton cannot lower: report and go on
                print(f"rows {rows} {name}: failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
                continue
            results.append((rows, name, t, floor))
            print(f"rows {rows} {name}: {t * 1e6:.1f} us ({t / floor:.2f}x)", flush=True)
    # The kernel as shipped must agree with XLA's product.
    for attr, value in shipped.items():
        setattr(kernel, attr, value)
    x = jnp.asarray(rs.standard_normal((16, 4096)), jnp.bfloat16)
    w = int8[4]
    got = kernel.int8_matmul(x, w)
    want = jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    print(f"shipped kernel vs XLA: max |diff| / max |y| = {err:.2e}")
    assert err < 1e-5, err
    assert q8.int8_product(x, w, 1).shape == (16, 14336)

    print()
    print(header(f"int8 products of {args.layers} Llama-3-8B layers ({n_bytes / 1e9:.2f} GB int8), "
                 f"floor at {args.bandwidth / 1e12:.2f} TB/s"))
    print(f"shipped: {shipped}")
    print(f"{'rows':>5}  {'what':<72}{'us':>9}{'floor':>9}{'ratio':>7}")
    for rows in (1, 16):
        mine = sorted((r for r in results if r[0] == rows), key=lambda r: r[2])
        shown = [r for r in mine if not r[1].startswith("Pallas")] + [r for r in mine if r[1].startswith("Pallas")][:6]
        for _, name, t, fl in shown:
            print(f"{rows:>5}  {name:<72}{t * 1e6:>9.1f}{fl * 1e6:>9.1f}{t / fl:>7.2f}")


if __name__ == "__main__":
    main()
