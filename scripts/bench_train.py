"""Training speed: tp_zoo at each tp against KerasHub's own single-device Llama.

    python scripts/bench_train.py --shape llama3_1b --tp 1 2 --batch 8 --seq 1024

Both models: the same shapes, random weights, mixed_bfloat16, AdamW, a
cross-entropy loss (tp_zoo's vocab-parallel one; KerasHub's sparse
categorical), `train_on_batch` on a fixed random batch. Reports the median
step time over --steps steps after --warmup steps, tokens/s and model
TFLOP/s = 6 x parameters x tokens/s. The table comes last.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import header  # noqa: E402
from bench_common import hf_config  # noqa: E402
from bench_common import jax  # noqa: E402
from bench_common import keras  # noqa: E402
from bench_common import add_model_arguments  # noqa: E402
from bench_common import each_model  # noqa: E402

import numpy as np  # noqa: E402


def step_times(lm, batch, seq, vocab, warmup, steps):
    rs = np.random.RandomState(0)
    ids = rs.randint(0, vocab, (batch, seq + 1)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((batch, seq), "int32")}
    y = ids[:, 1:]
    for _ in range(warmup):
        lm.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = lm.train_on_batch(x, y)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
        loss = None if name == "tp_zoo" else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-4), weighted_metrics=[],
                   **({"loss": loss} if loss is not None else {}))
        params = sum(int(np.prod(v.shape)) for v in lm.trainable_variables)
        seconds = step_times(lm, args.batch, args.seq, config["vocab_size"], args.warmup, args.steps)
        tokens = args.batch * args.seq / seconds
        rows.append((name, tp, seconds * 1000, tokens, 6 * params * tokens / 1e12))
        print(f"{name} tp={tp}: {seconds * 1000:.1f} ms/step", flush=True)
    print()
    print(header(f"train, shape {args.shape}, mixed_bfloat16, AdamW, batch {args.batch} x {args.seq} tokens"))
    print(f"{'model':<24}{'tp':>4}{'ms/step':>10}{'tokens/s':>12}{'model TFLOP/s':>15}")
    for name, tp, ms, tokens, tflops in rows:
        print(f"{name:<24}{tp:>4}{ms:>10.1f}{tokens:>12,.0f}{tflops:>15.1f}")


if __name__ == "__main__":
    main()
