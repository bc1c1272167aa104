"""What makes a model family itself, and the registry of families.

A family is a folder tp_zoo/models/<name>/ whose file <name>.py holds its
backbone's translation of a Hugging Face config, its classes, and one
`Family` entry, registered when `tp_zoo.models` imports the file: the model
types it reads, its tokenizer's BOS convention and its layout map
(tp_zoo/presets/layouts/<layout>.json). Its named checkpoints are the
entries of tp_zoo/presets/presets.json whose "family" is its name.
Everything else is the shared decoder.
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
        for family in _FAMILIES:
            if family.name == self.name:
                raise ValueError(f"A family named {self.name!r} is already registered.")
            shared = set(family.model_types) & set(self.model_types)
            if shared:
                raise ValueError(f"Family {self.name!r}: model types {sorted(shared)} are read by {family.name!r}.")
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


def load_preset(preset, expected_class, **kwargs):
    """`tp_zoo.from_preset(preset, **kwargs)`, refusing a checkpoint whose
    family's classes are not (subclasses of) `expected_class`: the model
    classes' own `from_preset`."""
    # KerasHub's API puts from_preset on the model classes, while reading a
    # checkpoint is the checkpoint room's, above this one: this is the one
    # place this room reaches up, importing it when called. (A loader that
    # the checkpoint room installed here when imported would be missing after
    # `import tp_zoo.models` alone, since `import tp_zoo` imports nothing.)
    from tp_zoo.checkpoint.from_preset import load_for_class

    return load_for_class(preset, expected_class, **kwargs)
