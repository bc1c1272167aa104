"""bfloat16 fidelity: tp_zoo's bf16 logits are as close to float32 as transformers' own.

For each family case (`checkpoints.FAMILY_CASES`: OPT pre-LN, OPT post-LN
with project_in/out, GPT-2, Llama GQA, Mistral's sliding window, Qwen2 with
biases) a random checkpoint widened to hidden 256 and 4 layers (so that
bf16 error is well above noise) gives three sets of logits
on the shared right-padded batch: transformers in float32 (the reference),
transformers in bfloat16 (`model.to(torch.bfloat16)`), and tp_zoo loaded
with `from_preset(path, tp=2, dtype="bfloat16")`. The error is the mean
|logit - reference| over the real (unpadded) positions; tp_zoo's may exceed
transformers' by at most 5% (TOLERANCE), the spread between random
checkpoints of a computation as precise as transformers'. `pytest -s`
prints a table line per family.
"""

import gc

import numpy as np
import pytest

import tp_zoo
from tests.models import checkpoints as ckpts

TOLERANCE = 1.05

@pytest.fixture(scope="module")
def table():
    rows = {}
    yield rows
    if rows:
        lines = [f"{'family':<24} {'tp_zoo':>8} {'transformers':>12} {'ratio':>6}"]
        for name, (ours, theirs) in rows.items():
            lines.append(f"{name:<24} {ours:>8.4f} {theirs:>12.4f} {ours / theirs:>6.3f}")
        print("\n\nbf16 mean |logit - float32 reference| (real positions):\n" + "\n".join(lines))


@pytest.mark.parametrize("name", list(ckpts.FAMILY_CASES))
def test_bf16_logits_as_close_as_transformers(name, tmp_path, table):
    import torch

    model = ckpts.build_model(ckpts.CASES[name], **ckpts.FAMILY_CASES[name])
    ids, mask = ckpts.batch(model.config.vocab_size)
    reference = ckpts.reference_logits(model, ids, mask)
    ckpts.save(model, tmp_path)
    theirs = ckpts.reference_logits(model.to(torch.bfloat16), ids, mask)
    del model

    lm = tp_zoo.from_preset(str(tmp_path), tp=2, dtype="bfloat16", progress=False)
    ours = np.asarray(lm({"token_ids": ids, "padding_mask": mask})).astype("float32")
    del lm
    gc.collect()

    real = mask.astype(bool)
    ours_err = float(np.abs(ours - reference)[real].mean())
    theirs_err = float(np.abs(theirs - reference)[real].mean())
    table[name] = (ours_err, theirs_err)
    print(f"\n{name}: tp_zoo {ours_err:.4f}, transformers {theirs_err:.4f} (bf16 mean |diff|)")
    assert ours_err <= theirs_err * TOLERANCE, (
        f"{name}: tp_zoo's bf16 logits are {ours_err:.4f} from float32 on average, "
        f"transformers' {theirs_err:.4f} (more than {TOLERANCE}x)"
    )
