"""tp-zoo finetune: data, resumable sharded checkpoints, a kill mid-save, bad input."""

import json
import os
import subprocess
import sys

import pytest

import tp_zoo
from tests.helpers import assert_close
from tp_zoo import demo
from tp_zoo.errors import CheckpointMismatchError
from tp_zoo.checkpoint.training_state import latest_checkpoint
from tp_zoo.checkpoint.training_state import restore_training_state
from tp_zoo.finetune import finetune
from tp_zoo.models.llama import LlamaBackbone
from tp_zoo.models.llama import LlamaCausalLM

STEPS = dict(steps=8, batch_size=4, seq_len=16, lr=3e-3, progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The demo's small Llama-style checkpoint (with tokenizer) and its text as data."""
    root = tmp_path_factory.mktemp("ft")
    demo.write_checkpoint(root / "model", demo.demo_text(), vocab_size=300)
    (root / "data.txt").write_text(demo.demo_text())
    return root


@pytest.fixture(scope="module")
def uninterrupted(checkpoint):
    lm = tp_zoo.from_preset(checkpoint / "model", tp=2, progress=False)
    return finetune(lm, checkpoint / "data.txt", **STEPS)


_RUN = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import tp_zoo, json
from tp_zoo.finetune import finetune
from tp_zoo.models.llama import LlamaBackbone
from tp_zoo.models.llama import LlamaCausalLM
if len(sys.argv) > 5:  # die (SIGKILL) after the first piece of this step's save is written
    from tp_zoo.checkpoint import training_state
    write = training_state._write_safetensors

    def dying_write(path, tensors):
        def first_then_die():
            for i, item in enumerate(tensors):
                if i == 1 and f"step_{int(sys.argv[5]):08d}" in str(path):
                    os.kill(os.getpid(), 9)
                yield item
        return write(path, first_then_die())

    training_state._write_safetensors = dying_write
lm = tp_zoo.from_preset(sys.argv[1], tp=int(sys.argv[4]), progress=False)
losses = finetune(lm, sys.argv[2], steps=8, batch_size=4, seq_len=16, lr=3e-3, save_every=2, out=sys.argv[3], progress=False)
print(json.dumps(losses))
"""


def _run(checkpoint, out, tp, kill_at=None):
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    args = [str(checkpoint / "model"), str(checkpoint / "data.txt"), str(out), str(tp)]
    if kill_at is not None:
        args.append(str(kill_at))
    return subprocess.run(
        [sys.executable, "-c", _RUN, *args],
        env=env, capture_output=True, text=True, timeout=600,
    )


def test_killed_mid_save_resumes_with_the_same_loss_curve(checkpoint, uninterrupted, tmp_path):
    killed = _run(checkpoint, tmp_path, tp=2, kill_at=6)
    assert killed.returncode == -9, killed.stderr[-2000:]
    checkpoints = tmp_path / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "step_00000004"  # the half-written step 6 is not taken
    assert (checkpoints / ".step_00000006.tmp").exists()
    # Resume, at another tp: steps 5..8 continue the uninterrupted curve.
    resumed = _run(checkpoint, tmp_path, tp=4)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    losses = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert len(losses) == 4
    diff = assert_close(uninterrupted[4:], losses, "loss after resume")
    print(f"\nresumed at tp=4 from step 4 after a kill during the step-6 save: loss max|diff| {diff:.2e}")
    assert latest_checkpoint(checkpoints).name == "step_00000008"
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_checkpoint_of_another_model_is_refused(checkpoint, tmp_path):
    lm = tp_zoo.from_preset(checkpoint / "model", tp=1, progress=False)
    finetune(lm, checkpoint / "data.txt", **{**STEPS, "steps": 1}, out=tmp_path / "run")
    config = {**json.loads((checkpoint / "model" / "config.json").read_text()), "num_hidden_layers": 2}
    two_layers = LlamaCausalLM(backbone=LlamaBackbone.from_hf_config(config, dtype="float32"))
    two_layers.compile(optimizer="adamw")
    with pytest.raises(CheckpointMismatchError, match="different model"):
        restore_training_state(two_layers, latest_checkpoint(tmp_path / "run" / "checkpoints"))


@pytest.mark.parametrize(
    "kwargs,files,match",
    [
        ({"seq_len": 4096}, {"data.txt": "hello"}, "beyond the model's 128 positions"),
        ({}, {"data.txt": ""}, "is empty"),
        ({}, {"data.txt": "hello"}, "not enough for one sequence"),
        ({}, {"data.jsonl": '{"text": "a"}\n{"oops": 1}\n'}, r"data.jsonl:2 has the keys \['oops'\]"),
        ({}, {"data.csv": "a,b"}, "must be .txt or .jsonl"),
        ({"batch_size": 3}, {"data.txt": "x"}, r"batch_size=3 is not divisible by dp=2"),
        ({"lora_rank": 0}, {"data.txt": demo.demo_text()}, "LoRA rank must be a positive integer"),
    ],
)
def test_bad_input(checkpoint, tmp_path, kwargs, files, match):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    lm = tp_zoo.from_preset(checkpoint / "model", tp=2, dp=2, progress=False)
    with pytest.raises(ValueError, match=match):
        finetune(lm, tmp_path / next(iter(files)), **{**STEPS, **kwargs})


def test_lora_on_an_int8_base_resumes_at_another_tp(checkpoint, tmp_path):
    """An int8 base streamed from the checkpoint, LoRA trained on it for 4
    steps at tp=2 with checkpoints every 2, resumed at tp=4 for 2 more: the
    run continues from its checkpoint, and the export (LoRA merged, kernels
    dequantized) is a float model computing what the merged int8 model does."""
    import numpy as np

    int8 = tp_zoo.from_preset(checkpoint / "model", tp=2, quantize="int8", progress=False)
    first = finetune(int8, checkpoint / "data.txt", **{**STEPS, "steps": 4}, lora_rank=4, save_every=2,
                     out=tmp_path / "run")
    assert len(first) == 4
    again = tp_zoo.from_preset(checkpoint / "model", tp=4, quantize="int8", progress=False)
    more = finetune(again, checkpoint / "data.txt", **{**STEPS, "steps": 6}, lora_rank=4, save_every=2,
                    out=tmp_path / "run")
    assert len(more) == 2  # steps 5 and 6 only: resumed from step 4
    exported = tp_zoo.from_preset(tmp_path / "run" / "model", tp=1, progress=False)
    assert all(v.dtype != "int8" for v in exported.weights)
    ids = np.arange(1, 17, dtype="int32")[None]
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    assert_close(np.asarray(again(x)), np.asarray(exported(x)), "export of the merged int8 model")
