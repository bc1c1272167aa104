"""LoRA adapters in PEFT's format (adapter_config.json + adapter_model.safetensors), both ways.

PEFT adapts a torch Linear of weight W (out, in) to W x + scaling * B (A x),
with lora_A.weight of shape (r, in) and lora_B.weight (out, r). tp_zoo
adapts a kernel (*in_dims, *out_dims) by kernel + (lora_alpha / rank) * A @ B,
with A (*in_dims, r) and B (r, *out_dims): A is a kernel whose output is r
and B one whose input is r. The family's layout map says which module's
weight each kernel (or part of a fused q/k/v or gate/up kernel) is, and
that weight is the kernel flattened to (in, out) and transposed: the same
turns A into lora_A (r, in) and B into lora_B (out, r). Files hold the
adapters at their true shapes (tp padding cut off), so they load at any tp.

Example:
```python
lm = tp_zoo.from_preset("llama3.2_1b", tp=2)
lm.backbone.enable_lora(8)                   # query and value
lm.fit(texts, batch_size=8)
save_peft_adapter(lm, "adapter")             # peft.PeftModel.from_pretrained(hf_model, "adapter")
lm4 = tp_zoo.from_preset("llama3.2_1b", tp=4, adapter="adapter")
```
"""

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tp_zoo.checkpoint.layout import Layout
from tp_zoo.checkpoint.tensor_files import SafetensorsFile
from tp_zoo.checkpoint.tensor_files import write_safetensors
from tp_zoo.errors import CheckpointMismatchError
from tp_zoo.errors import CheckpointNotFoundError
from tp_zoo.errors import CorruptCheckpointError
from tp_zoo.errors import UnsupportedConfigError
from tp_zoo.layers.base import inputs_last
from tp_zoo.layers.base import part_path
from tp_zoo.layers.base import set_weights
from tp_zoo.layers.base import true_shape
from tp_zoo.layers.base import true_value
from tp_zoo.layers.storage import kernel_order
from tp_zoo.models import family_of

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PeftModelForCausalLM's prefix of the base model's module names.
_PREFIX = "base_model.model."
_TENSOR_NAME = re.compile("^" + re.escape(_PREFIX) + r"(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
# PEFT options that change what an adapter computes beyond plain LoRA; each
# must be unset (false, null or empty). bias is checked on its own ("none").
_UNSUPPORTED_OPTIONS = ("use_dora", "lora_bias", "modules_to_save", "rank_pattern", "alpha_pattern",
                        "layer_replication", "trainable_token_indices", "target_parameters")


class _Module(NamedTuple):
    """A projection (or one part of a fused projection) as the Hugging Face
    Linear module whose weight it is."""

    name: str  # "model.layers.0.self_attn.q_proj"
    target: str  # tp_zoo's LoRA target name: the part's or the layer's ("query", "output")
    layer: object  # the tp_zoo projection
    part: str  # its part of a fused kernel, or None
    in_shape: tuple  # the kernel's input dims, true sizes
    out_shape: tuple  # the kernel's output dims, true sizes

    @property
    def short_name(self):
        return self.name.rsplit(".", 1)[-1]

    @property
    def adapted(self):
        """Whether LoRA is enabled on this module."""
        if not self.layer.lora_enabled:
            return False
        return self.part is None or self.part in [p.layer for p in self.layer.lora_parts]

    def adapters(self):
        """Its (A, B) LoRA variables."""
        prefix = "" if self.part is None else f"{self.part}_"
        return getattr(self.layer, prefix + "lora_kernel_a"), getattr(self.layer, prefix + "lora_kernel_b")

    def peft_shapes(self, rank):
        """(lora_A.weight's shape, lora_B.weight's) at `rank`."""
        return (rank, math.prod(self.in_shape)), (math.prod(self.out_shape), rank)


def _modules(causal_lm):
    """{Hugging Face module name: `_Module`} of every projection LoRA can adapt
    (attention, MLP, OPT's project_in/out)."""
    config = causal_lm.hf_config
    if config is None:
        raise ValueError("This model has no Hugging Face config (it was not loaded from one): "
                         "PEFT adapters name its modules, so there is nothing to map them to.")
    family = family_of(config)
    layout = Layout(family.layout)
    modules = {}
    for layer in causal_lm.backbone._flatten_layers(include_self=False):
        if not hasattr(layer, "lora_variables"):
            continue
        n_in = len(layer.in_trailing)
        fused = layer.parts_of(layer.kernel_shape_built, kernel=True)
        if fused is None:  # an int8 kernel's paddings are output-major
            views = [(None, layer.kernel.path, kernel_order(true_shape(layer.kernel), inputs_last(layer.kernel)))]
        else:
            views = [(p.layer, part_path(layer.kernel.path, p), tuple(d.true_size for d in p.padding))
                     for p in fused.parts]
        for part, path, shape in views:
            entry, tensor = layout.find(path)
            linear = [list(range(n_in)), list(range(n_in, len(shape)))]
            if entry is None or entry.part is not None or not entry.transposed or entry.groups(len(shape)) != linear:
                fused_part = ", one part of a fused tensor" if entry is not None and entry.part else ""
                where = "in no layout entry" if entry is None else f"{tensor} ({entry.transform!r}{fused_part})"
                raise UnsupportedConfigError(
                    f"{family.name}: tp_zoo maps PEFT adapters of torch Linear modules only (the OPT, Llama, "
                    f"Mistral and Qwen2 families), and {path} is {where}, not the weight of a Linear of its own."
                )
            modules[tensor.removesuffix(".weight")] = _Module(
                tensor.removesuffix(".weight"), part or layer.name, layer, part, shape[:n_in], shape[n_in:]
            )
    return modules


def _as_linear_weight(value, n_in):
    """A tp_zoo kernel-shaped array (*in_dims, *out_dims) as a torch Linear's weight (out, in)."""
    return np.ascontiguousarray(value.reshape(math.prod(value.shape[:n_in]), -1).T)


def _base_model_name(causal_lm):
    """The checkpoint the model was loaded from: its Hub repo id if it came
    through the Hugging Face cache, else its directory; None if unknown."""
    directory = getattr(causal_lm, "checkpoint_directory", None)
    if directory is None:
        return None
    cached = [part for part in Path(directory).parts if part.startswith("models--")]
    return cached[-1][len("models--"):].replace("--", "/") if cached else str(directory)


def save_peft_adapter(causal_lm, directory):
    """Writes the model's LoRA adapters as a PEFT adapter in `directory`:
    adapter_config.json and adapter_model.safetensors, each adapter in its
    own dtype, at its true shape. `peft.PeftModel.from_pretrained(model,
    directory)` then computes, on the transformers model of the same
    checkpoint, what this model does. The config is written last and any
    old one removed first, so an interrupted write leaves no directory that
    looks like a complete adapter. Returns `directory` (a Path)."""
    adapted = [m for m in _modules(causal_lm).values() if m.adapted]
    if not adapted:
        raise ValueError("The model has no LoRA adapters: call backbone.enable_lora(rank) first.")
    settings = {(m.layer.lora_rank, m.layer.lora_alpha) for m in adapted}
    if len(settings) > 1:
        raise ValueError(f"The model's LoRA layers differ in (rank, alpha) {sorted(settings)}: "
                         "a PEFT adapter written by tp_zoo has one rank and one alpha.")
    ((rank, alpha),) = settings

    def tensors():
        for module in adapted:
            a, b = module.adapters()
            yield f"{_PREFIX}{module.name}.lora_A.weight", _as_linear_weight(true_value(a), len(module.in_shape))
            yield f"{_PREFIX}{module.name}.lora_B.weight", _as_linear_weight(true_value(b), 1)

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": _base_model_name(causal_lm),
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted({m.short_name for m in adapted}),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).unlink(missing_ok=True)
    write_safetensors(directory / WEIGHTS_NAME, tensors())
    temporary = directory / (CONFIG_NAME + ".tmp")
    temporary.write_text(json.dumps(config, indent=2))
    os.replace(temporary, directory / CONFIG_NAME)
    return directory


def read_adapter_config(directory):
    """The adapter_config.json of a PEFT adapter directory, checked: both
    files present, a LoRA adapter, no option tp_zoo's LoRA cannot compute."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointNotFoundError(f"{directory} has no {CONFIG_NAME}: not a PEFT adapter directory.")
    if not (directory / WEIGHTS_NAME).is_file():
        pickled = (directory / "adapter_model.bin").is_file()
        raise CheckpointNotFoundError(
            f"{directory} has no {WEIGHTS_NAME}"
            + (" (only the pickled adapter_model.bin: save it with safe_serialization=True, PEFT's default)."
               if pickled else ": the adapter's weights are missing.")
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptCheckpointError(f"{path} is not valid JSON: {error}.") from None
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{path} holds a JSON {type(config).__name__}, not an object of settings.")
    if config.get("peft_type") != "LORA":
        raise UnsupportedConfigError(
            f"{directory} is a PEFT {config.get('peft_type')!r} adapter: tp_zoo loads LoRA adapters only."
        )
    unsupported = [f"{key}={config[key]!r}" for key in _UNSUPPORTED_OPTIONS if config.get(key)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if unsupported:
        raise UnsupportedConfigError(
            f"{directory}: the adapter sets {', '.join(unsupported)}, which tp_zoo's LoRA does not compute: it "
            "loads plain LoRA (one rank and alpha for every module, bias 'none', no DoRA, no modules_to_save)."
        )
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise CorruptCheckpointError(f"{path}: r = {rank!r} is not a positive integer rank.")
    return config


def _read_adapter_tensors(directory):
    """{module name: {"A": array, "B": array}} of adapter_model.safetensors."""
    file = SafetensorsFile(Path(directory) / WEIGHTS_NAME)
    by_module, others = {}, []
    for name in file.tensors:
        match = _TENSOR_NAME.match(name)
        if match is None:
            others.append(name)
        else:
            by_module.setdefault(match["module"], {})[match["which"]] = np.array(file.array(name), np.float32)
    file.close()
    if others:
        raise UnsupportedConfigError(
            f"{directory}/{WEIGHTS_NAME} holds tensors that are not LoRA A/B weights of a causal LM "
            f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): tp_zoo loads plain LoRA adapters."
        )
    if not by_module:
        raise CorruptCheckpointError(f"{directory}/{WEIGHTS_NAME} holds no LoRA weights.")
    halves = [f"{name}.lora_{'B' if 'A' in pair else 'A'}.weight"
              for name, pair in by_module.items() if len(pair) != 2]
    if halves:
        raise CorruptCheckpointError(f"{directory}/{WEIGHTS_NAME} lacks {', '.join(halves[:3])}.")
    return by_module


def load_peft_adapter(causal_lm, directory):
    """Loads a PEFT LoRA adapter (as `PeftModel.save_pretrained` writes it)
    onto the model, at any tp (padding made for it). LoRA is enabled with the
    adapter's rank and targets if it is not yet; if it is, the rank must be
    the adapter's, its targets must include the adapter's, and adapters the
    file lacks are zeroed (B). PEFT's scale (lora_alpha / r, or / sqrt(r)
    with use_rslora) is folded into B where the layer's own differs. Every
    check (config, module names, shapes against the model's) is made before
    the model changes."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    modules = _modules(causal_lm)
    by_module = _read_adapter_tensors(directory)
    unknown = sorted({re.sub(r"\.\d+\.", ".{i}.", name) for name in by_module if name not in modules})
    if unknown:
        supported = {m.short_name: m.target for m in modules.values()}
        raise UnsupportedConfigError(
            f"{directory}: the adapter adapts modules tp_zoo cannot map: {', '.join(unknown)}; this "
            f"{family_of(causal_lm.hf_config).name} model's LoRA targets are "
            f"{', '.join(f'{hf} ({ours})' for hf, ours in sorted(supported.items()))}."
        )
    rank = config["r"]
    _check_shapes(directory, modules, by_module, rank)
    adapted = [m for m in modules.values() if m.adapted]
    if adapted:
        ranks = sorted({m.layer.lora_rank for m in adapted})
        if ranks != [rank]:
            raise CheckpointMismatchError(
                f"{directory} holds adapters of rank {rank}; this model has LoRA enabled at rank "
                f"{'/'.join(map(str, ranks))}: load it onto a model without LoRA, or enabled at rank {rank}."
            )
        missing = sorted({modules[name].target for name in by_module if not modules[name].adapted})
        if missing:
            raise CheckpointMismatchError(
                f"{directory} adapts {', '.join(missing)}, which this model has no LoRA on (enabled on "
                f"{', '.join(sorted({m.target for m in adapted}))}): load it onto a model without LoRA."
            )
    _warn_if_other_base(causal_lm, config)
    if not adapted:
        causal_lm.backbone.enable_lora(rank, target_layer_names=sorted({modules[n].target for n in by_module}))
        adapted = [m for m in modules.values() if m.adapted]
    alpha = config.get("lora_alpha", 8)  # PEFT's default
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    variables, values = [], []
    for module in adapted:
        a, b = module.adapters()
        pair = by_module.get(module.name)
        if pair is None:  # a module the adapter leaves as it is
            variables.append(b)
            values.append(np.zeros((rank,) + module.out_shape, np.float32))
            continue
        fold = scale / (module.layer.lora_alpha / module.layer.lora_rank)  # PEFT's scale over the layer's
        variables += [a, b]
        values += [pair["A"].T.reshape(module.in_shape + (rank,)),
                   pair["B"].T.reshape((rank,) + module.out_shape) * fold]
    set_weights(variables, values)


def _check_shapes(directory, modules, by_module, rank):
    """Refuses adapters whose A/B shapes are not this model's at `rank`."""
    for name, pair in sorted(by_module.items()):
        expected = modules[name].peft_shapes(rank)
        got = (pair["A"].shape, pair["B"].shape)
        if got != expected:
            raise CheckpointMismatchError(
                f"{directory}: lora_A/lora_B of {name} are {got[0]}/{got[1]}; at r={rank} this model's "
                f"({expected[0][1]} in, {expected[1][0]} out features) are {expected[0]}/{expected[1]}: "
                "the adapter was made for another base model."
            )


def _warn_if_other_base(causal_lm, config):
    """A warning when the adapter names a base model other than this one's
    (compared by last path component: a repo id and a local copy named after it agree)."""
    theirs, ours = config.get("base_model_name_or_path"), _base_model_name(causal_lm)
    if theirs and ours and Path(theirs).name != Path(ours).name:
        warnings.warn(f"The adapter was made for {theirs}; this model was loaded from {ours}.", stacklevel=3)
