"""Decode speed: tp_zoo at each tp against KerasHub's own single-device Llama.

    python scripts/bench_decode.py --shape llama3_8b --tp 1 2 --batch 1 16

Both models get the same shapes and random weights (built directly on the
devices, sharded for tp_zoo), the same greedy sampler and the same compiled
KerasHub generate loop. Per-token time = (t(prompt + 128 new) - t(prompt +
1 new)) / 127, each the best of --repeats runs after a warm-up, so prefill
and compilation cancel out. The table comes last.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import LlamaCausalLM  # noqa: E402
from bench_common import header  # noqa: E402
from bench_common import hf_config  # noqa: E402
from bench_common import add_model_arguments  # noqa: E402
from bench_common import each_model  # noqa: E402
from bench_common import jax  # noqa: E402

import numpy as np  # noqa: E402


def time_generate(lm, batch, prompt, new, repeats):
    """Best wall time of lm.generate over `repeats` runs, after one warm-up."""
    length = prompt + new
    rs = np.random.RandomState(0)
    ids = np.zeros((batch, length), "int32")
    ids[:, :prompt] = rs.randint(3, 1000, (batch, prompt))
    mask = np.zeros_like(ids)
    mask[:, :prompt] = 1
    inputs = {"token_ids": ids, "padding_mask": mask}
    generate = (lambda: lm.generate(inputs, stop_token_ids=None)) if not isinstance(lm, LlamaCausalLM) else (
        lambda: lm.generate(inputs, max_length=length, stop_token_ids=None))
    jax.block_until_ready(generate())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(generate())
        best = min(best, time.perf_counter() - start)
    return best


def per_token_ms(lm, batch, prompt, new, repeats):
    t_long = time_generate(lm, batch, prompt, new, repeats)
    t_one = time_generate(lm, batch, prompt, 1, repeats)
    return 1000 * (t_long - t_one) / (new - 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = hf_config(args.shape)
    rows = []
    for name, tp, lm in each_model(config, args.tp, args.dtype, args.skip_keras_hub):
        lm.compile(sampler="greedy")
        for batch in args.batch:
            ms = per_token_ms(lm, batch, args.prompt, args.new, args.repeats)
            rows.append((name, tp, batch, ms, batch * 1000 / ms))
            print(f"{name} tp={tp} batch={batch}: {ms:.3f} ms/token", flush=True)
    print()
    print(header(f"decode, shape {args.shape}, {args.dtype}, prompt {args.prompt}, {args.new} new tokens, greedy"))
    print(f"{'model':<24}{'tp':>4}{'batch':>7}{'ms/token':>11}{'tokens/s':>11}")
    for name, tp, batch, ms, tps in rows:
        print(f"{name:<24}{tp:>4}{batch:>7}{ms:>11.3f}{tps:>11.1f}")


if __name__ == "__main__":
    main()
