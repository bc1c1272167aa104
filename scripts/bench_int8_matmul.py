"""The int8 product of a decode step alone: x (1 or 16 rows, bf16) times
every int8 kernel of some Llama-3-8B layers, XLA's way beside the Pallas
kernel's (a sweep of its conversion, block sizes and split target), each
beside the floor (int8 bytes / --bandwidth), beside bf16 kernels of the
same shapes, and beside the Pallas kernel on those bf16 kernels.

    python scripts/bench_int8_matmul.py [--layers 32]

Each figure is the GPU kernel time (from a profiler trace, so host
dispatch does not count) of one compiled program running all the products
of --layers layers (no L2 reuse: every layer has its own kernels), the
mean of 3 calls. `--best-out` writes the fastest setting (`Int8MatmulConfig`
fields), which `bench_decode.py --int8-kernel-settings` takes. The table
comes last.
"""

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import device_time  # noqa: E402
from bench_common import header  # noqa: E402
from bench_common import jax  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tp_zoo import kernels  # noqa: E402
from tp_zoo.kernels import int8_matmul  # noqa: E402
from tp_zoo.layers.quantize import int8 as q8  # noqa: E402

# (K, N) of one Llama-3-8B layer's products: q/k/v fused, o, gate/up fused, down.
LAYER = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]


def grid(**choices):
    return [dict(zip(choices, values)) for values in itertools.product(*choices.values())]


# Kernel settings to try: Int8MatmulConfig fields.
SWEEP = grid(block_n=(32, 64, 128), block_k=(128, 256, 512), target_programs=(132, 264),
             num_warps=(4, 8), num_stages=(3, 5))


def time_of(f, *args):
    return device_time(lambda: f(*args), 3)


def all_products(product, in_axis):
    """One program of `product(x, w)` over every kernel, x cut to each
    kernel's reduction dim (its axis `in_axis`)."""
    def run(x, kernels):
        return [product(x[:, :w.shape[in_axis]], w) for w in kernels]

    return jax.jit(run)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s for the floor")
    parser.add_argument("--best-out", help="write the fastest setting over 1 and 16 rows (KEY=VALUE ...) here")
    args = parser.parse_args()
    rs = np.random.RandomState(0)
    shapes = LAYER * args.layers
    int8 = [jnp.asarray(rs.randint(-127, 128, (n, k)), jnp.int8) for k, n in shapes]  # output-major
    bf16 = [w.T.astype(jnp.bfloat16) for w in int8]  # (K, N), as XLA's bf16 layers hold them
    n_bytes = sum(w.size for w in int8)
    floor = n_bytes / args.bandwidth
    knobs = sorted({k for s in SWEEP for k in s})
    shipped = {field: getattr(kernels.Int8MatmulConfig(), field) for field in knobs}
    xla = []  # (rows, name, seconds, floor)
    pallas = {}  # (rows, setting as a tuple) -> seconds
    check_x = jnp.asarray(rs.standard_normal((16, 4096)), jnp.bfloat16)
    want = jnp.dot(check_x, int8[2].T.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    for rows in (1, 16):
        x = jnp.asarray(rs.standard_normal((rows, 14336)), jnp.bfloat16)
        cases = [
            ("XLA bf16 kernels (2 bytes each)", all_products(lambda x, w: jnp.dot(x, w), 0), bf16, 2 * floor),
            ("XLA int8 -> bf16, f32 out", all_products(
                lambda x, w: jnp.dot(x, w.astype(x.dtype).T, preferred_element_type=jnp.float32), 1), int8, floor),
        ]
        for name, f, ws, fl in cases:
            t = time_of(f, x, ws)
            xla.append((rows, name, t, fl))
            print(f"rows {rows} {name}: {t * 1e6:.1f} us ({t / fl:.2f}x its floor)", flush=True)
        for setting in SWEEP + [{"weights": "bf16"}]:
            weights = [w.T for w in bf16] if setting.get("weights") else int8
            config = kernels.Int8MatmulConfig(**{k: v for k, v in setting.items() if k != "weights"})
            try:
                with kernels.configured(kernels.KernelConfigs(int8_matmul=config)):
                    got = int8_matmul.int8_matmul(check_x[:rows], weights[2])
                    err = float(jnp.max(jnp.abs(got - want[:rows])) / jnp.max(jnp.abs(want[:rows])))
                    assert err < 1e-5, f"wrong products: max |diff| / max |y| = {err:.2e}"
                    t = time_of(all_products(int8_matmul.int8_matmul, 1), x, weights)
            except Exception as e:  # a setting Triton cannot lower: report and go on
                print(f"rows {rows} {setting}: failed ({type(e).__name__}: {str(e)[:300]})", flush=True)
                continue
            pallas[rows, tuple(setting.items())] = t
            print(f"rows {rows} Pallas {setting}: {t * 1e6:.1f} us ({t / floor:.2f}x)", flush=True)
    assert q8.int8_product(check_x, int8[2].T, 1).shape == (16, 28672)
    both = {s for (_, s) in pallas if (1, s) in pallas and (16, s) in pallas and "weights" not in dict(s)}
    best = min(both, key=lambda s: pallas[1, s] + pallas[16, s]) if both else None
    if best and args.best_out:
        Path(args.best_out).write_text(" ".join(f"{k}={v}" for k, v in best))

    print()
    print(header(f"int8 products of {args.layers} Llama-3-8B layers ({n_bytes / 1e9:.2f} GB int8), "
                 f"floor at {args.bandwidth / 1e12:.2f} TB/s"))
    print(f"shipped: {shipped}; fastest over 1 and 16 rows: {dict(best) if best else None}")
    print(f"{'rows':>5}  {'what':<80}{'us':>9}{'floor':>9}{'ratio':>7}")
    for rows in (1, 16):
        for r, name, t, fl in xla:
            if r == rows:
                print(f"{rows:>5}  {name:<80}{t * 1e6:>9.1f}{fl * 1e6:>9.1f}{t / fl:>7.2f}")
        mine = sorted(((t, s) for (r, s), t in pallas.items() if r == rows))
        for t, s in mine[:10] + [m for m in mine if "weights" in dict(m[1])]:
            name = "Pallas " + " ".join(f"{k}={v}" for k, v in s)
            fl = floor * (2 if "weights" in dict(s) else 1)
            print(f"{rows:>5}  {name:<80}{t * 1e6:>9.1f}{fl * 1e6:>9.1f}{t / fl:>7.2f}")


if __name__ == "__main__":
    main()
