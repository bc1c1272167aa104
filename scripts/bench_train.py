"""Training speed: tp_zoo at each tp against KerasHub's own single-device Llama.

    python scripts/bench_train.py --shape llama3_1b --tp 1 2 --batch 8 --seq 1024

Both models: the same shapes, random weights, mixed_bfloat16, AdamW, a
cross-entropy loss (tp_zoo's vocab-parallel one; KerasHub's sparse
categorical), `train_on_batch` on a fixed random batch. Reports the median
step time over --steps steps after --warmup steps, tokens/s and model
TFLOP/s = 6 x parameters x tokens/s. The table comes last.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import add_model_arguments  # noqa: E402
from bench_common import compile_for_training  # noqa: E402
from bench_common import each_model  # noqa: E402
from bench_common import header  # noqa: E402
from bench_common import hf_config  # noqa: E402
from bench_common import median_step_time  # noqa: E402
from bench_common import trainable_parameters  # noqa: E402
from bench_common import training_flops  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    config = hf_config(args.shape)
    rows = []
    for name, tp, lm in each_model(config, args.tp, "mixed_bfloat16", args.skip_keras_hub):
        compile_for_training(lm)
        params = trainable_parameters(lm)
        seconds = median_step_time(lm, args.batch, args.seq, config["vocab_size"], args.warmup, args.steps)
        tokens = args.batch * args.seq / seconds
        rows.append((name, tp, seconds * 1000, tokens, training_flops(params, tokens) / 1e12))
        print(f"{name} tp={tp}: {seconds * 1000:.1f} ms/step", flush=True)
    print()
    print(header(f"train, shape {args.shape}, mixed_bfloat16, AdamW, batch {args.batch} x {args.seq} tokens"))
    print(f"{'model':<24}{'tp':>4}{'ms/step':>10}{'tokens/s':>12}{'model TFLOP/s':>15}")
    for name, tp, ms, tokens, tflops in rows:
        print(f"{name:<24}{tp:>4}{ms:>10.1f}{tokens:>12,.0f}{tflops:>15.1f}")


if __name__ == "__main__":
    main()
