"""How far int8 weights move a model: logits of the int8 form against its
bf16 form (same weights), and greedy agreement over --new tokens.

    python scripts/check_int8_quality.py --shape llama3_1b

Random weights (the hub is out of reach here): the figures bound what the
rounding does to this model's numbers, not quality on text.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import SHAPES  # noqa: E402
from bench_common import batch_of  # noqa: E402
from bench_common import header  # noqa: E402
from bench_common import hf_config  # noqa: E402
from bench_common import tp_zoo_model  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    lm = tp_zoo_model(hf_config(args.shape), args.tp, "bfloat16")
    inputs = batch_of([args.prompt] * args.batch, args.prompt)
    lm.compile(sampler="greedy")

    def run():
        logits = np.asarray(lm(inputs), "float32")
        out = lm.generate(inputs, max_new_tokens=args.new, stop_token_ids=None)
        return logits, np.asarray(out["token_ids"])[:, args.prompt:]

    float_logits, float_ids = run()
    lm.quantize("int8")
    int8_logits, int8_ids = run()

    diff = np.abs(int8_logits - float_logits)
    scale = np.abs(float_logits).max()
    top1 = (int8_logits.argmax(-1) == float_logits.argmax(-1)).mean()
    same = int8_ids == float_ids
    prefix = [int(np.argmin(row)) if not row.all() else len(row) for row in same]
    print()
    print(header(f"int8 vs bf16 weights, shape {args.shape}, tp={args.tp}, random weights, "
                 f"{args.batch} prompts of {args.prompt}"))
    print(f"logits: max |diff| {diff.max():.4f} = {diff.max() / scale:.2%} of max |logit| ({scale:.3f}); "
          f"mean |diff| {diff.mean():.4f}")
    print(f"top-1 agreement at the {inputs['token_ids'].size} prompt positions: {top1:.2%}")
    print(f"greedy ids over {args.new} new tokens: {same.mean():.2%} equal; "
          f"identical prefix per row {prefix}")


if __name__ == "__main__":
    main()
