"""Prefill speed: one forward pass over a long prompt, tp_zoo at each tp
against KerasHub's own single-device Llama.

    python scripts/bench_prefill.py --shape llama3_8b --tp 1 2 --tokens 2048

Times a jitted forward pass (logits of every position) of batch 1 x
--tokens, best of --repeats after a warm-up. The table comes last.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import add_model_arguments  # noqa: E402
from bench_common import best_forward_time  # noqa: E402
from bench_common import each_model  # noqa: E402
from bench_common import header  # noqa: E402
from bench_common import hf_config  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = hf_config(args.shape)
    rows = []
    for name, tp, lm in each_model(config, args.tp, args.dtype, args.skip_keras_hub):
        seconds = best_forward_time(lm, args.tokens, args.repeats)
        rows.append((name, tp, seconds * 1000, args.tokens / seconds))
        print(f"{name} tp={tp}: {seconds * 1000:.2f} ms", flush=True)
    print()
    print(header(f"prefill, shape {args.shape}, {args.dtype}, batch 1 x {args.tokens} tokens"))
    print(f"{'model':<24}{'tp':>4}{'ms':>10}{'tokens/s':>12}")
    for name, tp, ms, tokens in rows:
        print(f"{name:<24}{tp:>4}{ms:>10.2f}{tokens:>12,.0f}")


if __name__ == "__main__":
    main()
