"""tp=2 against tp=1 on the same weights: logits, greedy ids and three AdamW
steps, in float32 and bfloat16. For GPUs; on a CPU it runs on simulated
devices as a smoke test.

    python scripts/check_gpu_parity.py                               # llama_small
    python scripts/check_gpu_parity.py --shape llama3_8b --layers 1  # one layer at the 8B width

The default shape, llama_small, has 4 layers, hidden 1024, 16 heads over 4
kv heads (head_dim 64, so the GPU decode kernel applies), MLP 2816, vocab
32000. Per dtype, one set of random weights (seeded): the tp=1 model is
made, then the same architecture under tp_zoo.distribution(tp=2), which
takes the tp=1 model's weights (set_weights(get_weights()): true shapes at
every tp). Then:

1. logits of --prompts right-padded prompts of ragged lengths, at their
   real positions: max |diff|, and that over max |logit|;
2. greedy ids of --new new tokens per prompt: a row that differs passes only
   when, at its first differing token, tp=1's logits of the two tokens are
   within the logits tolerance (a near tie that rounding may flip);
3. three AdamW steps (train_on_batch, learning rate 1e-3, the prompts as the
   batch) from the same weights: each step's loss, |diff| over
   max(1, |loss|). The bfloat16 pass trains in mixed_bfloat16 (float32
   weights, bf16 compute): Keras' Adam (3.15.1) computes its bias
   correction in the variable's dtype, where beta_2 = 0.999 rounds to 1, so
   bf16 variables never move (the losses stay flat, at any tp).

Tolerances (relative, as above):
- float32: 1e-4 for logits and losses, at tp_zoo's own matmul precision
  (float32 products at HIGHEST on GPUs, tp_zoo/layers/precision.py: JAX's
  default TF32 alone would move logits by ~1e-3 between two summation
  orders). The tests' 1e-5 is for tiny models on CPUs.
- bfloat16: 5e-2 for logits, 2e-2 for losses (the precision's default
  setting): bf16 keeps 8 bits, ~4e-3 per rounding, and tp=2 rounds each
  row-parallel partial sum before its all-reduce; the tests hold
  mixed_bfloat16 training to 2e-2.

Exits 1 when a figure is past its tolerance. The table comes last.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import SHAPES  # noqa: E402
from bench_common import batch_of  # noqa: E402
from bench_common import header  # noqa: E402
from bench_common import hf_config  # noqa: E402
from bench_common import jax  # noqa: E402
from bench_common import keras  # noqa: E402
from bench_common import tp_zoo_model  # noqa: E402

import numpy as np  # noqa: E402

# dtype: (logits tolerance, loss tolerance)
TOLERANCES = {
    "float32": (1e-4, 1e-4),
    "bfloat16": (5e-2, 2e-2),
    "mixed_bfloat16": (5e-2, 2e-2),
}
# bf16 variables do not train under Keras' Adam (see above).
TRAINING_DTYPE = {"bfloat16": "mixed_bfloat16"}
STEPS = 3


def training_batch(inputs):
    """Each position predicts the next id; the last real one of a row has no
    target, so its weight is 0."""
    ids, mask = inputs["token_ids"], inputs["padding_mask"]
    targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
    weights = np.concatenate([mask[:, 1:], np.zeros_like(mask[:, :1])], axis=1)
    return targets, weights


def same_weights(config, dtype, weights=None):
    """(tp=1 model, tp=2 model) holding the same weights: `weights`, or the
    tp=1 model's random (seeded) ones."""
    keras.utils.set_random_seed(0)
    tp1 = tp_zoo_model(config, 1, dtype)
    if weights is not None:
        tp1.set_weights(weights)
    tp2 = tp_zoo_model(config, 2, dtype)
    tp2.set_weights(tp1.get_weights())
    return tp1, tp2


def logits_of(lm, inputs):
    return np.asarray(lm(inputs), "float32")


def losses_of(lm, inputs):
    targets, weights = training_batch(inputs)
    lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-3), weighted_metrics=[])
    return [float(lm.train_on_batch(inputs, targets, sample_weight=weights)) for _ in range(STEPS)]


def greedy_ids(lm, inputs, new):
    lm.compile(sampler="greedy")
    out = lm.generate(inputs, max_new_tokens=new, stop_token_ids=None)
    lengths = inputs["padding_mask"].sum(axis=1)
    return [np.asarray(row[length:length + new]) for row, length in zip(out["token_ids"], lengths)]


def first_difference_gap(lm, inputs, row, ids_1, ids_2):
    """Where greedy rows first differ, tp=1's logit of its own token minus its
    logit of tp=2's token (>= 0: tp=1 chose the larger), and the position."""
    at = int(np.argmax(ids_1 != ids_2))
    length = int(inputs["padding_mask"][row].sum())
    prefix = np.concatenate([inputs["token_ids"][row, :length], ids_1[:at]])[None, :]
    logits = logits_of(lm, {"token_ids": prefix, "padding_mask": np.ones_like(prefix)})[0, -1]
    return float(logits[ids_1[at]] - logits[ids_2[at]]), at


def compare(config, dtype, args):
    """[(check, tp=1 figure, tp=2 figure, difference, tolerance, ok)] for one dtype."""
    logits_tolerance, loss_tolerance = TOLERANCES[dtype]
    lengths = [args.prompt - (args.prompt * i) // (2 * args.prompts) for i in range(args.prompts)]
    inputs = batch_of(lengths, args.prompt)
    real = inputs["padding_mask"].astype(bool)
    results = []
    tp1, tp2 = same_weights(config, dtype)
    logits_1, logits_2 = logits_of(tp1, inputs)[real], logits_of(tp2, inputs)[real]
    scale = float(np.abs(logits_1).max())
    diff = float(np.abs(logits_1 - logits_2).max())
    results.append(("logits max |diff| / max |logit|", f"max |logit| {scale:.4f}", f"max |diff| {diff:.3e}",
                    diff / scale, logits_tolerance, diff <= logits_tolerance * scale))

    rows_1, rows_2 = greedy_ids(tp1, inputs, args.new), greedy_ids(tp2, inputs, args.new)
    for row, (ids_1, ids_2) in enumerate(zip(rows_1, rows_2)):
        if np.array_equal(ids_1, ids_2):
            results.append((f"greedy ids, prompt {row} ({lengths[row]} tokens)", f"{len(ids_1)} ids",
                            "equal", 0.0, logits_tolerance, True))
            continue
        gap, at = first_difference_gap(tp1, inputs, row, ids_1, ids_2)
        results.append((f"greedy ids, prompt {row} ({lengths[row]} tokens)", f"{len(ids_1)} ids",
                        f"differ at {at}, logit gap {gap:.3e}", abs(gap) / scale, logits_tolerance,
                        abs(gap) <= logits_tolerance * scale))

    training_dtype = TRAINING_DTYPE.get(dtype, dtype)
    if training_dtype != dtype:
        weights = tp1.get_weights()
        del tp1, tp2
        keras.backend.clear_session()
        tp1, tp2 = same_weights(config, training_dtype, weights)
    losses_1, losses_2 = losses_of(tp1, inputs), losses_of(tp2, inputs)
    for step, (loss_1, loss_2) in enumerate(zip(losses_1, losses_2), 1):
        relative = abs(loss_1 - loss_2) / max(1.0, abs(loss_1))
        check = f"AdamW step {step} loss" + (f" ({training_dtype})" if training_dtype != dtype else "")
        results.append((check, f"{loss_1:.6f}", f"{loss_2:.6f}", relative, loss_tolerance,
                        relative <= loss_tolerance))
    del tp1, tp2
    keras.backend.clear_session()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama_small", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, help="keep this many layers of the shape (1: one 8B-wide layer)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(TOLERANCES))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64, help="the longest prompt; the others are shorter")
    parser.add_argument("--new", type=int, default=32)
    args = parser.parse_args()
    config = hf_config(args.shape)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    if len(jax.devices()) < 2:
        raise SystemExit(f"tp=2 needs 2 devices; {len(jax.devices())} found")
    table = []
    for dtype in args.dtypes:
        for result in compare(config, dtype, args):
            table.append((dtype, *result))
            print(f"{dtype} {result[0]}: tp=1 {result[1]}, tp=2 {result[2]}, relative {result[3]:.2e}", flush=True)

    print()
    print(header(f"tp=2 against tp=1, same weights, shape {args.shape} with {config['num_hidden_layers']} layers, "
                 f"{args.prompts} prompts of up to {args.prompt} tokens, {args.new} new"))
    print(f"{'dtype':<16}{'check':<44}{'tp=1':<22}{'tp=2':<32}{'relative':>10}{'tolerance':>11}  ok")
    for dtype, check, one, two, relative, tolerance, ok in table:
        print(f"{dtype:<16}{check:<44}{one:<22}{two:<32}{relative:>10.2e}{tolerance:>11.0e}  {'ok' if ok else 'FAIL'}")
    failed = [row for row in table if not row[-1]]
    print(f"{len(failed)} of {len(table)} checks past their tolerance" if failed else f"all {len(table)} checks pass")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
