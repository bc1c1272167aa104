"""Where a decode token's GPU time goes: tp_zoo's Llama at tp=1, bf16 and
int8, kernels grouped by name, per new token.

    python scripts/profile_decode.py --shape llama3_8b [--batch 1 16] [--quantize int8]

Per token = (kernels of a generate() of 1 + N new tokens - those of 1 new
token) / N, from profiler traces, so prefill and compilation cancel out.
"wall" is the same difference in best-of-2 wall-clock time: when it is
close to the kernels' sum, the step is bound by its kernels, not by
launches. GPU only (a CPU run prints nothing useful). The table comes last.
"""

import argparse
import collections
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import SHAPES  # noqa: E402
from bench_common import batch_of  # noqa: E402
from bench_common import best_time  # noqa: E402
from bench_common import header  # noqa: E402
from bench_common import hf_config  # noqa: E402
from bench_common import kernel_events  # noqa: E402
from bench_common import tp_zoo_model  # noqa: E402

import keras  # noqa: E402


def kind(name):
    """A kernel's name without XLA's numeric suffixes (fusion.12, fusion_3)."""
    return re.sub(r"[._]?\d+$", "", re.sub(r"\.\d+", "", name))


def per_token(lm, batch, new, prompt=128):
    inputs = batch_of([prompt] * batch, prompt)
    walls, kernels = {}, collections.defaultdict(lambda: [0.0, 0.0])
    for n, sign in ((1, -1), (1 + new, 1)):
        call = lambda n=n: lm.generate(inputs, max_new_tokens=n, stop_token_ids=None)
        walls[n] = best_time(call, 2)
        for name, ns in kernel_events(call, 1):
            kernels[kind(name)][0] += sign / new
            kernels[kind(name)][1] += sign * ns / 1e3 / new
    return (walls[1 + new] - walls[1]) / new * 1e3, kernels


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new", type=int, default=8)
    parser.add_argument("--quantize", nargs="*", default=[None, "int8"], help="forms to profile (int8; none = bf16)")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    config = hf_config(args.shape)
    table = []
    for form in args.quantize or [None]:
        keras.utils.set_random_seed(0)
        lm = tp_zoo_model(config, 1, "bfloat16", form)
        lm.compile(sampler="greedy")
        for batch in args.batch:
            wall, kernels = per_token(lm, batch, args.new)
            table.append((form or "bf16", batch, wall, kernels))
            print(f"{form or 'bf16'} batch {batch}: {wall:.3f} ms/token", flush=True)
        del lm
        keras.backend.clear_session()

    print()
    print(header(f"decode kernels per new token, shape {args.shape}, tp=1, prompt 128, +{args.new}"))
    for form, batch, wall, kernels in table:
        busy = sum(us for _, us in kernels.values())
        count = sum(c for c, _ in kernels.values())
        print(f"{form} batch {batch}: wall {wall:.3f} ms/token, kernels {busy / 1e3:.3f} ms, {count:.0f} kernels")
        top = sorted(kernels.items(), key=lambda item: -item[1][1])[: args.top]
        for name, (c, us) in top:
            print(f"    {name[:64]:<64}{c:>7.1f} x {us:>9.1f} us")


if __name__ == "__main__":
    main()
