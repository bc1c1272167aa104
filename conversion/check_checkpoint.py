"""Checks a Hugging Face checkpoint directory against transformers.

    python conversion/check_checkpoint.py DIR --tp 1 2 4 [--batch 3 --seq 16]

Loads DIR with transformers (float32, the reference) and with
tp_zoo.from_preset at each tp, runs both on a random batch with right
padding, and prints the largest logit difference over the real tokens,
which must be within --tolerance x max(1, max |logit|) (the tests'
criterion; float32 products are float32 on GPUs too). Needs the test extra (transformers, torch). On a CPU-only machine the
devices are simulated.
"""

import argparse
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--tolerance", type=float, default=1e-5, help="relative to max(1, max |logit|)")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    import transformers

    import tp_zoo

    reference = transformers.AutoModelForCausalLM.from_pretrained(args.directory, dtype=torch.float32).eval()
    vocab = reference.config.vocab_size
    rs = np.random.RandomState(0)
    ids = rs.randint(0, vocab, (args.batch, args.seq)).astype("int32")
    mask = np.ones_like(ids)
    for row in range(1, args.batch):
        mask[row, args.seq - 2 * row :] = 0
    with torch.no_grad():
        ref = reference(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).logits.numpy()
    real = mask.astype(bool)
    scale = max(1.0, float(np.max(np.abs(ref[real]))))
    worst = 0.0
    print(f"{'tp':>4} {'max |logit diff|':>18}  {'max |logit|':>12}  {'relative':>9}")
    for tp in args.tp:
        lm = tp_zoo.from_preset(args.directory, tp=tp, dtype="float32", progress=False)
        got = np.asarray(lm({"token_ids": ids, "padding_mask": mask}))
        diff = float(np.max(np.abs(got[real] - ref[real])))
        worst = max(worst, diff / scale)
        print(f"{tp:>4} {diff:>18.3e}  {scale:>12.3f}  {diff / scale:>9.2e}")
    ok = worst <= args.tolerance
    print("OK" if ok else f"FAILED: {worst:.2e} > {args.tolerance:.1e} (relative)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
