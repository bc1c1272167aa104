"""What makes a model family itself, and the registry of families.

Each family file (tp_zoo/models/<family>/<family>.py) holds its backbone's
translation of a Hugging Face config, its classes, and one `Family` entry:
the model types it reads, its tokenizer's BOS convention and its layout map
(presets/layouts/<layout>.json). Everything else is the shared decoder.
"""

import dataclasses

from tp_zoo.errors import UnsupportedConfigError

_FAMILIES = []


@dataclasses.dataclass(frozen=True)
class Family:
    """One family: `name`, the config.json `model_types` it reads, its
    `causal_lm` class, whether its tokenizer starts prompts with BOS when
    tokenizer_config.json does not say (`adds_bos`), and its `layout` map."""

    name: str
    model_types: tuple
    causal_lm: type
    adds_bos: bool
    layout: str

    def register(self):
        _FAMILIES.append(self)
        return self


def families():
    return tuple(_FAMILIES)


def family_of(config):
    """The registered family of a Hugging Face config."""
    model_type = config.get("model_type")
    for family in _FAMILIES:
        if model_type in family.model_types:
            return family
    architectures = config.get("architectures") or ["unknown"]
    supported = sorted(t for f in _FAMILIES for t in f.model_types)
    raise UnsupportedConfigError(
        f"Unsupported architecture: model_type={model_type!r} ({', '.join(architectures)}). "
        f"tp_zoo supports model types: {', '.join(supported)}."
    )


# The checkpoint room (above this one) registers how presets are loaded, so
# that the families' classes can offer KerasHub's `Class.from_preset`.
_preset_loader = None


def set_preset_loader(load):
    """`load(preset, expected_class, **kwargs)` -> a CausalLM."""
    global _preset_loader
    _preset_loader = load


def load_preset(preset, expected_class, **kwargs):
    return _preset_loader(preset, expected_class, **kwargs)
