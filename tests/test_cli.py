"""The tp-zoo command: demo, presets, generate, its errors, and a quiet start."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from tp_zoo import cli

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_demo_fine_tunes_and_generates(tmp_path, capsys):
    assert cli.main(["demo", "--steps", "120", "--out", str(tmp_path / "demo")]) == 0
    text = capsys.readouterr().out
    assert "What each device holds" in text and "cpu:1" in text
    first, last = [float(x) for x in text.split("loss ")[1].split(" (last step)")[0].replace("(first step) -> ", "").split()]
    assert last < first - 1.0  # the loss visibly falls
    assert "tokens/s" in text
    # The checkpoint the demo wrote is a normal Hugging Face directory.
    assert cli.main(["generate", str(tmp_path / "demo"), "--tp", "2", "--prompt", "We hold these truths",
                     "--max-length", "20", "--top-k", "4", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("We hold these truths") == 1 and "new tokens in" in out
    # And its int8 form, quantized while loading.
    assert cli.main(["generate", str(tmp_path / "demo"), "--tp", "2", "--prompt", "We hold these truths",
                     "--max-new-tokens", "8", "--quantize", "int8"]) == 0
    assert "We hold these truths" in capsys.readouterr().out


def test_presets_lists_names(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "opt_125m" in out and "meta-llama/Meta-Llama-3-8B" in out


def test_tp_beyond_devices_says_how_many(tmp_path, capsys):
    assert cli.main(["generate", str(tmp_path), "--tp", "16", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "only 8 are available" in err and "xla_force_host_platform_device_count=16" in err


def test_start_up_prints_no_tensorflow_logs():
    # A fresh process, since TensorFlow logs only when first imported; without
    # TF_CPP_MIN_LOG_LEVEL (conftest sets it), as a user's shell would be.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from tp_zoo.cli import main; sys.exit(main(['presets']))"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "opt_125m" in run.stdout
    for noise in ("absl::InitializeLog", "oneDNN", "cuda drivers", "TensorFlow binary is optimized"):
        assert noise not in run.stderr, run.stderr
    # No absl/glog-format line ("I0000 00:00:1795599008.895946   13230 port.cc:153] ...") at all.
    assert not re.search(r"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\] ", run.stderr, re.M), run.stderr
