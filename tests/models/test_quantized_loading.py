"""from_preset(..., quantize="int8") streams int8 blocks that are exactly
what `lm.quantize("int8")` makes from the float model: every int8 value
(output-major) and scale bitwise equal, at tp 1, 2 and 4 (GQA kv heads
replicated at 4, GPT-2's fused q/k/v, OPT's biases) and at tp values that
pad the heads and MLP (padded channels: int8 zeros), and the same logits.
Export writes int8 kernels dequantized, in the checkpoint's layout."""

import json
import shutil
import warnings

import ml_dtypes  # noqa: F401  (float8 dtypes for numpy)
import numpy as np
import pytest
import safetensors.numpy

import tp_zoo
from tests.helpers import padded_entries
from tests.models import checkpoints as ckpts
from tp_zoo.checkpoint.export import export_to_hf
from tp_zoo.checkpoint.export import hf_tensors
from tp_zoo.errors import CheckpointMismatchError
from tp_zoo.errors import UnsupportedConfigError


@pytest.fixture(scope="module")
def checkpoint_dirs(tmp_path_factory):
    out = {}
    for name in ("llama_gqa_llama3_rope", "gpt2", "opt_pre_ln", "gpt2_25_heads_ffn_100", "qwen2_14_heads_gqa2"):
        path = tmp_path_factory.mktemp(name)
        ckpts.save(ckpts.build_model(ckpts.CASES[name]), path)
        out[name] = path
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", ["llama_gqa_llama3_rope", "gpt2", "opt_pre_ln"])
def test_streamed_int8_equals_quantize_after_loading(checkpoint_dirs, name, tp):
    _check_streamed_equals_after(checkpoint_dirs[name], name, tp)


@pytest.mark.parametrize("name,tp", [("gpt2_25_heads_ffn_100", 8), ("qwen2_14_heads_gqa2", 4)])
def test_streamed_int8_with_padded_heads_equals_quantize_after_loading(checkpoint_dirs, name, tp):
    _check_streamed_equals_after(checkpoint_dirs[name], name, tp)


def _check_streamed_equals_after(path, name, tp):
    streamed = tp_zoo.from_preset(path, tp=tp, dtype="float32", quantize="int8", progress=False)
    after = tp_zoo.from_preset(path, tp=tp, dtype="float32", progress=False)
    after.quantize("int8")
    ours = {v.path: v for v in streamed.weights}
    int8 = 0
    for variable in after.weights:
        mine = ours[variable.path]
        assert mine.dtype == variable.dtype and mine.shape == variable.shape, variable.path
        np.testing.assert_array_equal(np.asarray(mine.numpy()), np.asarray(variable.numpy()), err_msg=variable.path)
        int8 += variable.dtype == "int8"
    per_layer = 4  # q/k/v (one kernel), o, and the MLP's two (gate/up fused, or up), down
    untied_head = not streamed.backbone.tie_embeddings
    assert int8 == per_layer * streamed.backbone.num_layers + untied_head
    ids, mask = ckpts.batch(ckpts.CASES[name][2]["vocab_size"])
    x = {"token_ids": ids, "padding_mask": mask}
    np.testing.assert_array_equal(np.asarray(streamed(x)), np.asarray(after(x)))
    for variable in streamed.weights:
        if variable.dtype == "int8":
            assert not np.any(padded_entries(variable)), variable.path


def test_quantize_argument_errors(checkpoint_dirs):
    with pytest.raises(ValueError, match="unsupported quantization mode 'int4'; tp_zoo supports 'int8'"):
        tp_zoo.from_preset(checkpoint_dirs["gpt2"], quantize="int4", progress=False)


def _copy_checkpoint(source, target):
    target.mkdir()
    for file in source.iterdir():
        shutil.copy(file, target / file.name)
    return target


def test_checkpoint_quantized_by_another_tool_is_refused_by_name(checkpoint_dirs, tmp_path):
    gptq = _copy_checkpoint(checkpoint_dirs["gpt2"], tmp_path / "gptq")
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (gptq / "config.json").write_text(json.dumps(config))
    for quantize in (None, "int8"):
        with pytest.raises(UnsupportedConfigError, match=r"already quantized \('gptq'.*quantize='int8'"):
            tp_zoo.from_preset(gptq, tp=2, quantize=quantize, progress=False)

    # No quantization_config, but a weight stored as int8 (or float8): named, nothing built.
    for dtype in ("int8", "float8_e4m3fn"):
        packed = _copy_checkpoint(checkpoint_dirs["gpt2"], tmp_path / dtype)
        tensors = safetensors.numpy.load_file(packed / "model.safetensors")
        name = next(n for n in tensors if n.endswith("h.0.mlp.c_fc.weight"))
        tensors[name] = tensors[name].astype(dtype)
        safetensors.numpy.save_file(tensors, packed / "model.safetensors", metadata={"format": "pt"})
        for quantize in (None, "int8"):
            with pytest.raises(CheckpointMismatchError, match=rf"{name} .* is stored as {dtype}: an already quantized"):
                tp_zoo.from_preset(packed, tp=2, quantize=quantize, progress=False)


def test_export_of_a_quantized_model_dequantizes_and_says_so(checkpoint_dirs, tmp_path):
    lm = tp_zoo.from_preset(checkpoint_dirs["gpt2"], tp=2, dtype="float32", quantize="int8", progress=False)
    with pytest.warns(UserWarning, match="exported dequantized"):
        export_to_hf(lm, tmp_path / "out")
    back = tp_zoo.from_preset(tmp_path / "out", tp=2, dtype="float32", progress=False)
    ids, mask = ckpts.batch(101)
    x = {"token_ids": ids, "padding_mask": mask}
    # The float model made of the dequantized kernels computes what the int8 one does.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diff = np.abs(np.asarray(back(x)) - np.asarray(lm(x))).max()
    assert diff <= 1e-5 * max(1.0, float(np.abs(np.asarray(lm(x))).max()))


@pytest.mark.parametrize("name", ["llama_gqa_llama3_rope", "gpt2"])
def test_export_of_int8_writes_each_kernel_in_its_tensors_layout(checkpoint_dirs, name):
    """The exported int8 kernels (dequantized from output-major values) have
    the float export's shapes and values, each within half a scale: in the
    kernel's order, turned into the tensors' (Llama's Linear weights,
    transposed; GPT-2's Conv1D ones, not)."""
    path = checkpoint_dirs[name]
    lm = tp_zoo.from_preset(path, tp=2, dtype="float32", quantize="int8", progress=False)
    with pytest.warns(UserWarning, match="exported dequantized"):
        exported = dict(hf_tensors(lm))
    expected = dict(hf_tensors(tp_zoo.from_preset(path, tp=2, dtype="float32", progress=False)))
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in expected.items()}
    for key, tensor in exported.items():
        half_scale = np.abs(expected[key]).max() / 254 * (1 + 1e-6)  # max |w| / 127 / 2, over every channel
        assert np.abs(tensor - expected[key]).max() <= half_scale, key
