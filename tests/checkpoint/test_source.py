"""Where checkpoints come from: preset names and hf:// go through huggingface_hub."""

import re

import huggingface_hub
import pytest

from tests.helpers import hub_error
from tests.helpers import raising_snapshot_download
from tp_zoo.checkpoint import source
from tp_zoo.errors import CheckpointNotFoundError
from tp_zoo.errors import CorruptCheckpointError
from tp_zoo.errors import GatedCheckpointError
from tp_zoo.errors import HubUnreachableError


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


@pytest.mark.parametrize(
    "preset,repo",
    [("opt_125m", "facebook/opt-125m"), ("llama3.1_8b", "meta-llama/Llama-3.1-8B"), ("hf://org/some-model", "org/some-model")],
)
def test_presets_and_hf_urls_download_only_needed_files(fake_hub, preset, repo):
    source.checkpoint_directory(preset)
    (called_repo, patterns), = fake_hub
    assert called_repo == repo
    assert "*.safetensors" in patterns and "config.json" in patterns
    assert {"generation_config.json", "chat_template.jinja", "special_tokens_map.json"} <= set(patterns)
    assert not any(p.endswith(".bin") for p in patterns)


def test_pickled_files_are_fetched_only_on_opt_in(fake_hub):
    source.checkpoint_directory("gpt2", allow_pickle=True)
    assert any(p.endswith(".bin") for p in fake_hub[0][1])


def test_local_directory_is_used_as_is(fake_hub, tmp_path):
    assert source.checkpoint_directory(tmp_path) == tmp_path
    assert not fake_hub


def test_every_issue_preset_is_listed_with_a_repo():
    names = {"opt_125m", "opt_350m", "opt_1.3b", "opt_2.7b", "opt_6.7b", "opt_13b", "gpt2", "gpt2_medium",
             "gpt2_large", "gpt2_xl", "llama2_7b", "llama3_8b", "llama3.1_8b", "llama3.2_1b", "llama3.2_3b",
             "mistral_7b", "qwen2.5_0.5b", "qwen2.5_7b", "tinyllama_1.1b", "smollm2_135m", "smollm2_1.7b"}
    known = source.presets()
    assert names <= set(known)
    assert all("/" in known[n]["hf"] and known[n]["family"] in ("opt", "gpt2", "llama") for n in names)


def test_instruct_presets_are_listed_as_llama_style():
    names = {"llama3.1_8b_instruct", "llama3.2_1b_instruct", "llama3.2_3b_instruct", "qwen2.5_0.5b_instruct",
             "qwen2.5_1.5b_instruct", "qwen2.5_7b_instruct", "smollm2_135m_instruct", "smollm2_360m_instruct",
             "smollm2_1.7b_instruct", "mistral_7b_instruct_v0.3"}
    known = source.presets()
    assert names <= set(known)
    assert all(known[n]["hf"].endswith("Instruct") or known[n]["hf"].endswith("Instruct-v0.3") for n in names)
    assert all(known[n]["family"] == "llama" for n in names)


# --- a new user's first errors: one line each, naming the repo or file and the fix ---
@pytest.fixture
def hub_out_of_reach(monkeypatch, tmp_path):
    """The real huggingface_hub against an endpoint that refuses connections
    (at once, whatever the machine's network), with an empty cache."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def _one_line(error):
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_unreachable_hub_names_the_repo_and_what_to_do(hub_out_of_reach):
    with pytest.raises(HubUnreachableError) as raised:
        source.checkpoint_directory("opt_125m")
    message = _one_line(raised)
    assert "facebook/opt-125m" in message and "could not be reached" in message
    assert "local directory" in message and "cache" in message


def test_offline_mode_without_a_cached_copy_says_so(hub_out_of_reach, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnreachableError) as raised:
        source.checkpoint_directory("hf://org/some-model")
    message = _one_line(raised)
    assert "org/some-model" in message and "HF_HUB_OFFLINE is set" in message


def test_gated_repo_says_to_accept_the_license_and_log_in(monkeypatch):
    repo = "meta-llama/Meta-Llama-3-8B"
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        raising_snapshot_download(hub_error(huggingface_hub.errors.GatedRepoError, 403, repo)))
    with pytest.raises(GatedCheckpointError) as raised:
        source.checkpoint_directory("llama3_8b")
    message = _one_line(raised)
    assert repo in message and "license" in message and "HF_TOKEN" in message and "hf auth login" in message


def test_missing_repo_says_to_check_the_name(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        raising_snapshot_download(hub_error(huggingface_hub.errors.RepositoryNotFoundError, 401, "org/nope")))
    with pytest.raises(CheckpointNotFoundError) as raised:
        source.checkpoint_directory("hf://org/nope")
    message = _one_line(raised)
    assert "org/nope" in message and "Check the name" in message and "private" in message


def test_a_repo_name_without_hf_prefix_is_pointed_to_it(fake_hub):
    with pytest.raises(CheckpointNotFoundError, match=r"hf://facebook/opt-125m"):
        source.checkpoint_directory("facebook/opt-125m")
    assert not fake_hub


@pytest.mark.parametrize(
    "content,problem",
    [('{"model_type": "llama",', r"is not valid JSON: .* \(line 1, column 24\)"),
     ('["llama"]', "holds a JSON list, not an object"),
     (b"\xff\xfe{}", "cannot be read")],
)
def test_invalid_config_names_the_file_and_the_problem(tmp_path, content, problem):
    config = tmp_path / "config.json"
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CorruptCheckpointError, match=rf"{re.escape(str(config))} {problem}") as raised:
        source.read_config(tmp_path)
    _one_line(raised)


def test_unreadable_config_names_the_file(tmp_path):
    (tmp_path / "config.json").mkdir()  # a directory where the file should be
    with pytest.raises(CorruptCheckpointError, match="config.json cannot be read"):
        source.read_config(tmp_path)
