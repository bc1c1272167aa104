"""tp-zoo finetune: data, resumable sharded checkpoints, a kill mid-save, bad
settings refused before a model loads, resumes that do not fit refused."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import tp_zoo
from tests.helpers import assert_close
from tp_zoo import demo
from tp_zoo.checkpoint.training_state import latest_checkpoint
from tp_zoo.checkpoint.training_state import restore_training_state
from tp_zoo.errors import CheckpointMismatchError
from tp_zoo.errors import DataFileError
from tp_zoo.errors import FinetuneSettingsError
from tp_zoo.finetune import check_finetune
from tp_zoo.finetune import check_resumes_model
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
    write = training_state.write_safetensors

    def dying_write(path, tensors):
        def first_then_die():
            for i, item in enumerate(tensors):
                if i == 1 and f"step_{int(sys.argv[5]):08d}" in str(path):
                    os.kill(os.getpid(), 9)
                yield item
        return write(path, first_then_die())

    training_state.write_safetensors = dying_write
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
    assert f"resuming from {checkpoints / 'step_00000004'}: step 4 of 8, no LoRA, tp=4 dp=1 (saved at tp=2 dp=1)" \
        in resumed.stderr
    diff = assert_close(uninterrupted[4:], losses, "loss after resume")
    print(f"\nresumed at tp=4 from step 4 after a kill during the step-6 save: loss max|diff| {diff:.2e}")
    assert latest_checkpoint(checkpoints).name == "step_00000008"
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_checkpoint_of_another_model_is_refused(checkpoint, tmp_path):
    lm = tp_zoo.from_preset(checkpoint / "model", tp=1, progress=False)
    finetune(lm, checkpoint / "data.txt", **{**STEPS, "steps": 1}, out=tmp_path / "run")
    saved = latest_checkpoint(tmp_path / "run" / "checkpoints")
    config = json.loads((checkpoint / "model" / "config.json").read_text())
    two_layers = LlamaCausalLM(backbone=LlamaBackbone.from_hf_config({**config, "num_hidden_layers": 2},
                                                                     dtype="float32"))
    two_layers.compile(optimizer="adamw")
    with pytest.raises(CheckpointMismatchError, match="different model"):
        restore_training_state(two_layers, saved)
    # The same shapes, another config (its manifest records the config).
    other = {**config, "rope_theta": 1234.0}
    other_rope = LlamaCausalLM(backbone=LlamaBackbone.from_hf_config(other, dtype="float32"), hf_config=other)
    other_rope.compile(optimizer="adamw")
    with pytest.raises(CheckpointMismatchError, match=r"its config differs in 1 entries \(rope_theta: "):
        restore_training_state(other_rope, saved)
    # tp-zoo finetune refuses it before loading the model, from its config.json.
    with pytest.raises(CheckpointMismatchError, match=r"its config differs in 1 entries \(rope_theta: "):
        check_resumes_model(tmp_path / "run", other)


def _data(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    return tmp_path / name


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"steps": 0}, r"^steps=0: must be a whole number of at least 1\.$"),
        ({"batch_size": 0}, r"^batch_size=0: must be"),
        ({"seq_len": -4}, r"^seq_len=-4: must be"),
        ({"steps": 2.5}, r"^steps=2.5: must be"),
        ({"lr": 0.0}, r"^lr=0.0: the learning rate must be a positive finite number\.$"),
        ({"lr": float("nan")}, r"^lr=nan: "),
        ({"lr": float("inf")}, r"^lr=inf: "),
        ({"lora_rank": 0}, r"^lora_rank=0: must be"),
        ({"stride": 0}, r"^stride=0: must be"),
        ({"save_every": 2}, r"^save_every=2 needs out, a folder to save the checkpoints in\.$"),
        ({"save_every": 0, "out": "run"}, r"^save_every=0: must be"),
        ({"batch_size": 3, "dp": 2}, r"^batch_size=3 is not divisible by dp=2\.$"),
        ({"batch_size": 6, "fsdp": 4}, r"^batch_size=6 is not divisible by fsdp=4\.$"),
        ({"dp": 2, "fsdp": 2}, r"^dp=2 and fsdp=2: give one of them \(fsdp devices split the batch too\)\.$"),
        ({"out": "a_file"}, r"a_file is a file, not a folder\.$"),
        ({"out": "a_file/run"}, r"run cannot be made: .*a_file is a file\.$"),
    ],
)
def test_settings_are_refused_before_a_model_loads(tmp_path, kwargs, match):
    """check_finetune (which finetune and tp-zoo finetune call first) refuses
    each in one line, and writes nothing."""
    data = _data(tmp_path, "data.txt", demo.demo_text())
    (tmp_path / "a_file").write_text("not a folder")
    if "out" in kwargs:
        kwargs = {**kwargs, "out": tmp_path / kwargs["out"]}
    settings = {k: v for k, v in STEPS.items() if k != "progress"}
    with pytest.raises(FinetuneSettingsError, match=match):
        check_finetune(data, **{**settings, **kwargs})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "data.txt"]


@pytest.mark.parametrize(
    "files,match",
    [
        ({"data.txt": ""}, "is empty"),
        ({"data.jsonl": '{"text": "a"}\n{"oops": 1}\n'}, r"data.jsonl:2 has the keys \['oops'\]"),
        ({"data.csv": "a,b"}, "must be .txt or .jsonl"),
    ],
)
def test_bad_data_is_refused_before_a_model_loads(tmp_path, files, match):
    [(name, content)] = files.items()
    with pytest.raises(DataFileError, match=match):
        check_finetune(_data(tmp_path, name, content))


@pytest.fixture(scope="module")
def tp2_dp2(checkpoint):
    return tp_zoo.from_preset(checkpoint / "model", tp=2, dp=2, progress=False)


@pytest.mark.parametrize(
    "kwargs,content,match",
    [
        ({"seq_len": 4096}, "hello", "beyond the model's 128 positions"),
        ({}, "hello", "not enough for one sequence"),
    ],
)
def test_bad_input_for_the_model(tp2_dp2, tmp_path, kwargs, content, match):
    """What only the model can tell is refused before anything is trained."""
    with pytest.raises(ValueError, match=match):
        finetune(tp2_dp2, _data(tmp_path, "data.txt", content), **{**STEPS, **kwargs}, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_lora_on_an_int8_base_resumes_at_another_tp(checkpoint, tmp_path, capsys):
    """An int8 base streamed from the checkpoint, LoRA trained on it for 4
    steps at tp=2 with checkpoints every 2, resumed at tp=4 for 2 more: the
    run continues from its checkpoint (and says so), and the export (LoRA
    merged, kernels dequantized) is a float model computing what the merged
    int8 model does. A resume with another LoRA rank, or none, is refused
    before the model loads; one with no steps left trains nothing, and
    exports only the model that is missing."""
    import numpy as np

    run = tmp_path / "run"
    lora = {**STEPS, "lora_rank": 4, "save_every": 2, "out": run}
    int8 = tp_zoo.from_preset(checkpoint / "model", tp=2, quantize="int8", progress=False)
    first = finetune(int8, checkpoint / "data.txt", **{**lora, "steps": 4})
    assert len(first) == 4
    again = tp_zoo.from_preset(checkpoint / "model", tp=4, quantize="int8", progress=False)
    capsys.readouterr()
    more = finetune(again, checkpoint / "data.txt", **{**lora, "steps": 6})
    assert len(more) == 2  # steps 5 and 6 only: resumed from step 4
    resumed = f"resuming from {run / 'checkpoints' / 'step_00000004'}: step 4 of 6, LoRA rank 4, tp=4 dp=1"
    assert f"finetune: {resumed} (saved at tp=2 dp=1).\n" in capsys.readouterr().err
    exported = tp_zoo.from_preset(run / "model", tp=1, progress=False)
    assert all(v.dtype != "int8" for v in exported.weights)
    ids = np.arange(1, 17, dtype="int32")[None]
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    assert_close(np.asarray(again(x)), np.asarray(exported(x)), "export of the merged int8 model")

    settings = {k: v for k, v in lora.items() if k != "progress"}
    for rank, asked in ((None, "no LoRA"), (8, "LoRA rank 8")):
        with pytest.raises(CheckpointMismatchError, match=rf"step_00000006 was trained with LoRA rank 4, this run "
                                                          rf"has {asked}: resume it with LoRA rank 4"):
            check_finetune(checkpoint / "data.txt", **{**settings, "steps": 8, "lora_rank": rank})

    written = (run / "model" / "model.safetensors").stat().st_mtime_ns
    assert finetune(again, checkpoint / "data.txt", **{**lora, "steps": 5}) == []
    assert (capsys.readouterr().err == f"finetune: nothing left to train (6 steps done); {run / 'model'} is "
                                       "exported already, not again.\n")
    assert (run / "model" / "model.safetensors").stat().st_mtime_ns == written
    shutil.rmtree(run / "model")
    fresh = tp_zoo.from_preset(checkpoint / "model", tp=2, quantize="int8", progress=False)
    assert finetune(fresh, checkpoint / "data.txt", **{**lora, "steps": 6}) == []
    assert f"nothing left to train (6 steps done); exporting that model to {run / 'model'}." in capsys.readouterr().err
    assert_close(np.asarray(exported(x)), np.asarray(tp_zoo.from_preset(run / "model", tp=1, progress=False)(x)),
                 "the model exported again")


def test_finetune_picks_remat_and_refuses_what_cannot_fit(checkpoint, monkeypatch, capsys):
    """remat="auto" takes the least recompute that fits the free memory; a
    step that fits in none is refused before it runs."""
    from tp_zoo.models import memory

    data = checkpoint / "data.txt"
    lm = tp_zoo.from_preset(checkpoint / "model", tp=2, progress=False)
    lm.compile(weighted_metrics=[])
    need = memory.training_memory(lm, 4, 32, "layers")
    monkeypatch.setattr(memory, "free_device_bytes", lambda lm: (need.total - need.weights) / 0.9 + 1)
    losses = finetune(lm, data, steps=2, batch_size=4, seq_len=32, progress=False)
    assert len(losses) == 2 and lm.remat == "layers"
    assert "finetune: remat='layers': about " in capsys.readouterr().err
    monkeypatch.setattr(memory, "free_device_bytes", lambda lm: 1000)
    steps = []
    monkeypatch.setattr(type(lm), "train_on_batch", lambda *a, **k: steps.append(1))
    with pytest.raises(tp_zoo.errors.DeviceMemoryError, match=r"^Training 4 x 32 tokens needs about"):
        finetune(lm, data, steps=2, batch_size=4, seq_len=32, progress=False)
    assert not steps  # refused before the first step


def test_cli_fine_tunes_fully_sharded_and_says_the_memory_before_loading(checkpoint, tmp_path, capsys, monkeypatch):
    """`tp-zoo finetune --tp 2 --fsdp 2` prints its per-device estimate
    before the model loads, trains, and says the mesh when it resumes; a
    step that cannot fit is refused before anything loads."""
    from tp_zoo import cli
    from tp_zoo.models import memory

    run = tmp_path / "run"
    common = ["finetune", str(checkpoint / "model"), "--data", str(checkpoint / "data.txt"), "--batch-size", "4",
              "--seq-len", "16", "--fsdp", "2", "--out", str(run)]
    args = [*common, "--steps", "2", "--tp", "2"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "finetune: before loading, remat='none': about " in err and " per device (weights " in err
    assert cli.main([*common, "--steps", "3", "--tp", "4"]) == 0
    assert f"resuming from {run / 'checkpoints' / 'step_00000002'}: step 2 of 3, no LoRA, tp=4 fsdp=2 " \
           "(saved at tp=2 fsdp=2)" in capsys.readouterr().err
    loaded = []
    monkeypatch.setattr(tp_zoo, "from_preset", lambda *a, **k: loaded.append(1))
    monkeypatch.setattr(memory, "free_device_bytes", lambda devices: 1000)
    assert cli.main(args) == 2
    assert "Training 4 x 16 tokens needs about" in capsys.readouterr().err and not loaded
