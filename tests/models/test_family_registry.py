"""The family registry is the one list of families: every registered family
has its layout map, its presets and its test cases (and every preset, layout
map and padding-table entry belongs to one), and a family registered in a
test is read by `tp_zoo.from_preset` with nothing else added.

The toy family reads model_type "toy_llama" with Llama's classes and layout
map; its checkpoint is transformers' Llama one with that model_type, and its
logits match transformers' within 1e-5 x max(1, max |logit|) at tp=2.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import tp_zoo
from tests.helpers import assert_close
from tests.models import checkpoints as ckpts
from tp_zoo import models
from tp_zoo.checkpoint.layout import presets_dir
from tp_zoo.checkpoint.source import presets
from tp_zoo.models import family as family_registry
from tp_zoo.models.causal_lm import DecoderCausalLM
from tp_zoo.models.family import Family

REPO = pathlib.Path(__file__).resolve().parents[2]


def _padding_table():
    spec = importlib.util.spec_from_file_location("padding_table", REPO / "conversion" / "padding_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_family_has_its_layout_presets_classes_and_test_cases():
    case_types = {ckpts.model_type(name) for name in ckpts.FAMILY_CASES}
    for family in models.families():
        assert (presets_dir() / "layouts" / f"{family.layout}.json").is_file(), family.name
        assert any(p["family"] == family.name for p in presets().values()), f"{family.name} has no preset"
        assert set(family.model_types) <= case_types, f"{family.name}: no FAMILY_CASES case for some model types"
        for cls in (family.causal_lm, family.causal_lm.backbone_cls):
            assert getattr(models, cls.__name__) is cls


def test_every_preset_layout_and_padding_size_belongs_to_a_family():
    names = {f.name for f in models.families()}
    for name, preset in presets().items():
        assert preset.keys() == {"hf", "family", "description"}, name
        assert preset["family"] in names, f"{name} names an unregistered family {preset['family']!r}"
    layouts = {path.stem for path in (presets_dir() / "layouts").glob("*.json")}
    assert layouts == {f.layout for f in models.families()}
    for layout in layouts:
        assert json.loads((presets_dir() / "layouts" / f"{layout}.json").read_text()).keys() <= {
            "ignore", "entries", "optional_prefixes"}
    _padding_table().check_sizes(presets())


def test_padding_table_refuses_sizes_that_do_not_match_the_presets():
    with pytest.raises(ValueError, match=r"none for \['new_preset'\], some for unknown presets \[\]"):
        _padding_table().check_sizes({**presets(), "new_preset": {}})


def test_a_model_type_is_read_by_one_family(monkeypatch):
    monkeypatch.setattr(family_registry, "_FAMILIES", list(family_registry._FAMILIES))
    llama = models.family_of({"model_type": "llama"})
    with pytest.raises(ValueError, match=r"Family 'other': model types \['mistral'\] are read by 'llama'"):
        Family("other", ("mistral",), llama.causal_lm, adds_bos=True, layout="llama").register()
    with pytest.raises(ValueError, match="A family named 'llama' is already registered"):
        Family("llama", ("new",), llama.causal_lm, adds_bos=True, layout="llama").register()


class ToyCausalLM(DecoderCausalLM):
    backbone_cls = models.LlamaBackbone


@pytest.fixture
def toy_checkpoint(tmp_path):
    """transformers' Llama checkpoint with model_type "toy_llama", and its logits."""
    model = ckpts.build_model(ckpts.CASES["llama_gqa_llama3_rope"])
    ids, mask = ckpts.batch(model.config.vocab_size)
    reference = ckpts.reference_logits(model, ids, mask)
    config = ckpts.save(model, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "toy_llama"}))
    return tmp_path, ids, mask, reference


def test_a_family_registered_in_a_test_loads_through_from_preset(toy_checkpoint, monkeypatch):
    path, ids, mask, reference = toy_checkpoint
    with pytest.raises(tp_zoo.errors.UnsupportedConfigError, match="model_type='toy_llama'"):
        tp_zoo.from_preset(path, progress=False)
    monkeypatch.setattr(family_registry, "_FAMILIES", list(family_registry._FAMILIES))
    Family("toy", ("toy_llama",), ToyCausalLM, adds_bos=True, layout="llama").register()
    lm = tp_zoo.from_preset(path, tp=2, dtype="float32", progress=False)
    assert type(lm) is ToyCausalLM
    real = mask.astype(bool)
    diff = assert_close(reference[real], np.asarray(lm({"token_ids": ids, "padding_mask": mask}))[real], "toy tp=2")
    print(f"\ntoy family at tp=2: max |logit diff| {diff:.2e}")
    assert type(ToyCausalLM.from_preset(path, progress=False)) is ToyCausalLM
    with pytest.raises(tp_zoo.errors.WrongFamilyError, match="is a toy checkpoint .* LlamaCausalLM loads llama"):
        models.LlamaCausalLM.from_preset(path, progress=False)


def test_class_from_preset_needs_no_other_import(llama_path):
    # A fresh process that imports only the model classes.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    code = ("import tp_zoo.models as m; lm = m.LlamaCausalLM.from_preset(r'%s', progress=False); "
            "print(type(lm).__name__, lm.load_stats['bytes_read'] == lm.load_stats['checkpoint_bytes'])" % llama_path)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-2:] == ["LlamaCausalLM", "True"]
