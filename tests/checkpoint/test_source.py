"""Where checkpoints come from: preset names and hf:// go through huggingface_hub."""

import huggingface_hub
import pytest

from tp_zoo.checkpoint import source


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
    assert all(known[n]["family"] == known[n]["layout"] == "llama" for n in names)
