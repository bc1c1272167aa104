"""The tp-zoo command: demo, presets, generate, its errors, and a quiet start."""

import os
import pathlib
import re
import subprocess
import sys
from types import SimpleNamespace

import huggingface_hub
import pytest

from tests.helpers import hub_error
from tests.helpers import raising_snapshot_download
from tp_zoo import cli
from tp_zoo import demo

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
    out, err = capsys.readouterr()
    assert out.count("We hold these truths") == 1 and "new tokens in" in err
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


def test_keras_imported_first_on_tensorflow_is_one_clear_error(tmp_path):
    """`import keras` before `import tp_zoo`, without KERAS_BACKEND, gives
    Keras' default backend, TensorFlow: tp_zoo refuses it at import, in one
    line, instead of failing deep inside a model build."""
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["KERAS_HOME"] = str(tmp_path)  # no keras.json choosing a backend
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-c", "import keras; import tp_zoo"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "ImportError: tp_zoo needs Keras' JAX backend, but Keras has chosen 'tensorflow' (keras was imported "
        "before tp_zoo): set KERAS_BACKEND=jax before importing keras."
    ), run.stderr


def test_demo_takes_every_gpu_up_to_what_its_model_splits_and_two_simulated_cpus():
    gpus = lambda n: [SimpleNamespace(platform="gpu")] * n
    assert [demo.default_tp(gpus(n)) for n in (1, 2, 3, 4, 6, 8, 16)] == [1, 2, 2, 4, 4, 8, 8]
    assert demo.default_tp([SimpleNamespace(platform="cpu")] * 8) == 2


def _error_line(err):
    """The CLI's whole stderr: one line, tp-zoo's error, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tp-zoo: error: "), err
    return lines[0]


def test_unreachable_hub_is_one_line_and_exits_non_zero(tmp_path):
    # A fresh process, as a user runs it, against an endpoint that refuses
    # connections (the real huggingface_hub path), with an empty cache.
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path), "HF_HUB_ETAG_TIMEOUT": "2"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from tp_zoo.cli import main; sys.exit(main(sys.argv[1:]))",
         "generate", "opt_125m", "--prompt", "hi"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 2
    line = _error_line(run.stderr)
    assert "facebook/opt-125m" in line and "could not be reached" in line


def test_gated_repo_is_one_line(monkeypatch, capsys):
    error = hub_error(huggingface_hub.errors.GatedRepoError, 403, "meta-llama/Meta-Llama-3-8B")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", raising_snapshot_download(error))
    assert cli.main(["generate", "llama3_8b", "--prompt", "hi"]) == 2
    assert "accept its license" in _error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "name,content,problem",
    [("missing.jsonl", None, "does not exist"),
     ("bad.jsonl", '{"text": "fine"}\nnot json\n', r"bad.jsonl:2: not JSON"),
     ("chats.jsonl", '{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}\n',
      r"chats.jsonl:1: Message 1 has the unknown role 'robot'"),
     ("pairs.jsonl", '{"prompt": "2 + 2 ="}\n', r"pairs.jsonl:1 has the keys \['prompt'\]"),
     ("empty.txt", "\n\n", "is empty"),
     ("data.csv", "a,b", "must be .txt or .jsonl")],
)
def test_finetune_refuses_bad_data_before_loading_the_model(monkeypatch, capsys, tmp_path, name, content, problem):
    _loading_fails(monkeypatch)
    if content is not None:
        (tmp_path / name).write_text(content)
    assert cli.main(["finetune", "opt_125m", "--data", str(tmp_path / name)]) == 2
    assert re.search(problem, _error_line(capsys.readouterr().err))


def _loading_fails(monkeypatch):
    import tp_zoo

    def from_preset(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings and data were checked")

    monkeypatch.setattr(tp_zoo, "from_preset", from_preset)


@pytest.mark.parametrize(
    "arguments,problem",
    [(["--steps", "0"], "steps=0: must be a whole number of at least 1"),
     (["--lr", "0"], "lr=0.0: the learning rate must be a positive finite number"),
     (["--lr", "nan"], "lr=nan: "),
     (["--batch-size", "0"], "batch_size=0: must be"),
     (["--seq-len", "-1"], "seq_len=-1: must be"),
     (["--save-every", "10"], "save_every=10 needs out"),
     (["--save-every", "0", "--out", "run"], "save_every=0: must be"),
     (["--batch-size", "3", "--dp", "2"], "batch_size=3 is not divisible by dp=2"),
     (["--out", "data.txt"], "data.txt is a file, not a folder")],
)
def test_finetune_refuses_bad_settings_before_loading_the_model(monkeypatch, capsys, tmp_path, arguments, problem):
    """One line each, exit status 2, nothing written (a run with --out naming
    a file used to train, then die with NotADirectoryError)."""
    _loading_fails(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("Some text to train on.")
    assert cli.main(["finetune", "opt_125m", "--data", "data.txt", *arguments]) == 2
    assert problem in _error_line(capsys.readouterr().err)
    assert [p.name for p in tmp_path.iterdir()] == ["data.txt"]


@pytest.mark.parametrize(
    "arguments,problem",
    [(["--temperature", "-0.5"], "temperature=-0.5: must be a finite number of at least 0 (0 is greedy)."),
     (["--temperature", "inf", "--seed", "1"], "temperature=inf: must be a finite number of at least 0 (0 is greedy)."),
     (["--top-k", "0"], "top_k=0: must be a whole number of at least 1."),
     (["--top-p", "0.9", "--top-k", "-1"], "top_k=-1: must be a whole number of at least 1."),
     (["--top-p", "1.01", "--temperature", "0"], "top_p=1.01: must be a number in (0, 1].")],
)
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_meaningless_sampling_is_refused_before_loading_the_model(monkeypatch, capsys, command, arguments, problem):
    _loading_fails(monkeypatch)
    prompt = ["--prompt", "hi"] if command == "generate" else []
    assert cli.main([command, "opt_125m", *prompt, *arguments]) == 2
    assert _error_line(capsys.readouterr().err) == f"tp-zoo: error: {problem}"


def test_chat_refuses_max_new_tokens_below_one_before_loading_the_model(monkeypatch, capsys):
    _loading_fails(monkeypatch)
    assert cli.main(["chat", "opt_125m", "--max-new-tokens", "0"]) == 2
    assert _error_line(capsys.readouterr().err) == "tp-zoo: error: --max-new-tokens 0: must be at least 1."
