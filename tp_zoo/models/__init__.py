"""Model families; each a backbone and a causal LM built from tp_zoo.layers.

A family is a folder here holding a file of its own name (llama/llama.py)
that registers it (see `family.py`); its classes are found here by their
names (`tp_zoo.models.LlamaCausalLM`). (generation/ is a package of another
kind.)
"""

import importlib
import pkgutil
from pathlib import Path

from tp_zoo.models.backbone import DecoderBackbone
from tp_zoo.models.backbone import DecoderConfig
from tp_zoo.models.causal_lm import DecoderCausalLM
from tp_zoo.models.family import families
from tp_zoo.models.family import family_of
from tp_zoo.models.preprocessor import CausalLMPreprocessor

for _module in pkgutil.iter_modules(__path__):
    if _module.ispkg and (Path(_module.module_finder.path) / _module.name / f"{_module.name}.py").exists():
        importlib.import_module(f"{__name__}.{_module.name}.{_module.name}")

for _family in families():
    for _cls in (_family.causal_lm, _family.causal_lm.backbone_cls):
        globals()[_cls.__name__] = _cls
