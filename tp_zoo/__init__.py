"""tp_zoo: Hugging Face LLMs as tensor-parallel KerasHub models on JAX.

The public names are imported on first use (PEP 562), so that `import
tp_zoo` is light and has no side effect beyond choosing Keras' backend; the
`tp-zoo` command uses that to hide TensorFlow's start-up log lines
(`tp_zoo.quiet_start`) before keras_hub imports TensorFlow.
"""

import importlib
import os
import sys

__version__ = "0.1.0"


def _choose_jax_backend():
    """tp_zoo is built on JAX collectives: choose Keras' backend unless the
    user did, and refuse another one now rather than deep inside a model
    build. Keras picks its backend once, when first imported: a keras
    imported before tp_zoo without KERAS_BACKEND runs on TensorFlow."""
    if "keras" in sys.modules:
        backend, why = sys.modules["keras"].backend.backend(), "keras was imported before tp_zoo"
    else:
        backend = os.environ.setdefault("KERAS_BACKEND", "jax")
        why = f"KERAS_BACKEND={backend}"
    if backend != "jax":
        raise ImportError(f"tp_zoo needs Keras' JAX backend, but Keras has chosen {backend!r} "
                          f"({why}): set KERAS_BACKEND=jax before importing keras.")


_choose_jax_backend()

# Public name -> the module that defines it (None: the name is a submodule).
_PUBLIC = {
    "from_preset": "tp_zoo.checkpoint",
    "list_presets": "tp_zoo.checkpoint",
    "distribution": "tp_zoo.parallel",
    "initialize": "tp_zoo.parallel",
    "errors": None,
    "layers": None,
    "losses": None,
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tp_zoo' has no attribute {name!r}")
    module = _PUBLIC[name]
    value = importlib.import_module(f"tp_zoo.{name}") if module is None else getattr(
        importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
