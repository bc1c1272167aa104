"""Saving a loaded model back in the Hugging Face safetensors layout.

The inverse of loading: each variable is fetched (one at a time, so the
host holds one tensor, not the model), cut to the real vocab, reshaped and
transposed back through its layout entry, and fused q/k/v parts are joined.
The file is written to a temporary name and renamed at the end, so an
interrupted export never leaves a file that looks complete.
"""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np

from tp_zoo.checkpoint.layout import Layout
from tp_zoo.checkpoint.tensor_files import write_safetensors
from tp_zoo.layers.base import weight_views
from tp_zoo.layers.quantize import LocalWeights
from tp_zoo.models import family_of

_COPIED = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
           "merges.txt", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


def _to_tensor(entry, value):
    """A variable's value in the tensor's layout (before any part / offset)."""
    groups = entry.groups(value.ndim)
    value = value.reshape([int(np.prod([value.shape[d] for d in g])) for g in groups])
    return np.ascontiguousarray(value.T if entry.transposed else value)


def _numpy_weights(layer):
    """A quantized layer's kernel (and scale) as `LocalWeights` of numpy arrays."""
    scale = None if layer.kernel_scale is None else layer.kernel_scale.numpy()
    return LocalWeights(layer.kernel.numpy(), scale=scale)


def hf_tensors(causal_lm):
    """Yields (tensor name, numpy array) in the Hugging Face layout, one at a time."""
    config = causal_lm.hf_config
    if config is None:
        raise ValueError("This model has no Hugging Face config (it was not loaded from one): nothing to export to.")
    layout = Layout(family_of(config).layout)
    fused = {}
    adapters_b = [
        v for l in causal_lm._flatten_layers() if getattr(l, "lora_enabled", False)
        for name, v in l.lora_variables() if name.endswith("_b")
    ]
    if any(np.any(np.asarray(v.numpy())) for v in adapters_b):
        raise ValueError(
            "The model has LoRA adapters that are not merged: call "
            "backbone.merge_lora() before exporting (or save them alone with "
            "backbone.save_lora_weights)."
        )
    # Quantized kernels are written dequantized by their scheme (int8: values
    # x scales) in the layer's dtype, in the kernel's order (weight_views
    # turns output-major values).
    quantized = {id(l.kernel): l for l in causal_lm._flatten_layers() if getattr(l, "scheme", None) and l.quantized}
    if quantized:
        modes = sorted({l.quantized for l in quantized.values()})
        warnings.warn(
            f"{len(quantized)} quantized kernels ({', '.join(modes)}) are exported dequantized, "
            "as float tensors: the Hugging Face layout has no quantized form here.",
            stacklevel=2,
        )
    scales = {id(l.kernel_scale) for l in quantized.values() if l.kernel_scale is not None}
    for variable in causal_lm.weights:
        if "lora_kernel" in variable.path or id(variable) in scales:
            continue
        padded = None
        if id(variable) in quantized:
            layer = quantized[id(variable)]
            padded = np.asarray(layer.scheme.dequantize(_numpy_weights(layer), layer.variable_dtype))
        for path, value in weight_views(variable, padded):
            entry, name = layout.find(path)
            if entry is None:
                raise ValueError(f"The layout map has no entry for variable {path}.")
            tensor = _to_tensor(entry, value)
            if entry.part is None:
                yield name, tensor
                continue
            axis, index, count = entry.part
            parts = fused.setdefault(name, {})
            parts[index] = tensor
            if len(parts) == count:
                yield name, np.concatenate([parts[i] for i in range(count)], axis=axis)
                del fused[name]


def export_to_hf(causal_lm, directory, dtype=None, chat_template=None):
    """Writes config.json and model.safetensors (and the tokenizer files of the
    source checkpoint, if any) to `directory`. The chat template (given, else
    the one `causal_lm.preprocessor` was set to, if any) is written to
    chat_template.jinja, which readers take over tokenizer_config.json's."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(causal_lm)
    if dtype is not None:
        tensors = ((k, v.astype(dtype)) for k, v in tensors)
    write_safetensors(directory / "model.safetensors", tensors)
    config = dict(causal_lm.hf_config)
    source = getattr(causal_lm, "checkpoint_directory", None)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if source is not None:
        for name in _COPIED:
            if (Path(source) / name).exists() and Path(source).resolve() != directory.resolve():
                shutil.copy(Path(source) / name, directory / name)
    chat_template = chat_template or getattr(causal_lm.preprocessor, "chat_template", None)
    if chat_template is not None:
        (directory / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return directory
