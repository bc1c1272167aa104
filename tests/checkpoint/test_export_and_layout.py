"""Export round trip, layout slicing arithmetic, and reading old config dialects."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

import tp_zoo
from tests.helpers import assert_close
from tp_zoo.checkpoint.export import export_to_hf
from tp_zoo.checkpoint.layout import LayoutEntry
from tp_zoo.models.hf_config import rope_settings


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     initializer_range=0.2)
    path = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("tp", [1, 2])
def test_export_round_trip_and_transformers_reads_it(gpt2_dir, tmp_path, tp):
    lm = tp_zoo.from_preset(gpt2_dir, tp=tp, dtype="float32", progress=False)
    out = export_to_hf(lm, tmp_path / "out")
    again = tp_zoo.from_preset(out, tp=tp, dtype="float32", progress=False)
    for a, b in zip(lm.weights, again.weights):
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()), err_msg=a.path)
    # transformers loads the export and computes the logits of the original.
    original = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    exported = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.tensor(np.random.RandomState(0).randint(0, 101, (2, 7)))
    with torch.no_grad():
        assert_close(original(ids).logits.numpy(), exported(ids).logits.numpy(), "exported logits", rel=1e-6)


def test_interrupted_export_leaves_no_file(gpt2_dir, tmp_path, monkeypatch):
    lm = tp_zoo.from_preset(gpt2_dir, tp=1, dtype="float32", progress=False)
    from tp_zoo.checkpoint import export

    original = export.hf_tensors

    def broken(causal_lm):
        yield from list(original(causal_lm))[:3]
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "hf_tensors", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_to_hf(lm, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.safetensors*"))


def test_export_keeps_the_chat_template(gpt2_dir, tmp_path):
    """The checkpoint's chat_template.jinja (where current transformers
    writes templates) goes with the export; a template given to the export
    (as finetune's chat_template) replaces it."""
    source = shutil.copytree(gpt2_dir, tmp_path / "source")
    (source / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    lm = tp_zoo.from_preset(source, tp=1, dtype="float32", progress=False)
    copied = export_to_hf(lm, tmp_path / "copied")
    assert (copied / "chat_template.jinja").read_text() == "{{ messages[0]['content'] }}"
    given = export_to_hf(lm, tmp_path / "given", chat_template="{{ messages[-1]['content'] }}")
    assert (given / "chat_template.jinja").read_text() == "{{ messages[-1]['content'] }}"


def test_slices_of_fused_qkv_head_split():
    """Heads 2..3 of the key part of a GPT-2 c_attn weight (in=8, 3 x 4 heads x 2)."""
    entry = LayoutEntry({"variable": "k", "tensor": "t", "transform": "conv1d_to_heads", "part": [1, 1, 3]})
    variable_shape = (8, 4, 2)
    assert entry.tensor_shape(variable_shape) == (8, 24)
    slices, block = entry.tensor_slices((8, 24), variable_shape, [None, (2, 4), None])
    assert slices == (slice(0, 8), slice(8 + 4, 8 + 8))
    assert block == (8, 4)


def test_slices_of_transposed_row_parallel():
    entry = LayoutEntry({"variable": "o", "tensor": "t", "transform": "heads_to_linear"})
    # torch Linear (out=6, heads*hd=4*2) -> variable (4, 2, 6); device holds heads 1..2.
    slices, block = entry.tensor_slices((6, 8), (4, 2, 6), [(1, 2), None, None])
    assert slices == (slice(0, 6), slice(2, 4)) and block == (2, 6)


def test_rope_settings_read_old_and_new_config_keys():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    old = {"rope_theta": 500000.0, "rope_scaling": dict(scaling)}
    new = {"rope_parameters": {"rope_theta": 500000.0, **scaling}}
    assert rope_settings(old) == rope_settings(new) == (500000.0, scaling)
    assert rope_settings({"rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}) == (1e4, None)
    assert rope_settings({}) == (10000.0, None)


def test_old_style_llama_config_loads_the_same(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=32, initializer_range=0.2,
                                      rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=1000.0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "new")
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    cfg = json.loads((tmp_path / "new" / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    ids = {"token_ids": np.arange(10, dtype="int32")[None], "padding_mask": np.ones((1, 10), "int32")}
    new = np.asarray(tp_zoo.from_preset(tmp_path / "new", dtype="float32", progress=False)(ids))
    old = np.asarray(tp_zoo.from_preset(tmp_path / "old", dtype="float32", progress=False)(ids))
    np.testing.assert_array_equal(new, old)
