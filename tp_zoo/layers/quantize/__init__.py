"""Kernel formats behind one interface (`QuantizationScheme`), by the mode
name `quantize()` takes: None (float) and "int8". A new format is a module
of its own (a `QuantizationScheme`) and its entry in `SCHEMES`."""

from tp_zoo.layers.quantize.dense import FloatScheme
from tp_zoo.layers.quantize.int8 import Int8Scheme
from tp_zoo.layers.quantize.scheme import FromKernel
from tp_zoo.layers.quantize.scheme import KernelSpec
from tp_zoo.layers.quantize.scheme import LocalWeights
from tp_zoo.layers.quantize.scheme import QuantizationScheme
from tp_zoo.layers.quantize.scheme import install
from tp_zoo.layers.quantize.scheme import use_own_quantize

SCHEMES = {None: FloatScheme(), "int8": Int8Scheme()}


def check_mode(mode, what="quantize"):
    """ValueError for a mode tp_zoo does not implement, naming those it does."""
    if mode is None or mode not in SCHEMES:
        supported = ", ".join(f"{m!r} ({s.description})" for m, s in SCHEMES.items() if m is not None)
        raise ValueError(f"{what}: unsupported quantization mode {mode!r}; tp_zoo supports {supported}.")


def scheme_for(mode, what="quantize"):
    """The scheme of `mode` (None: float); ValueError for an unknown mode."""
    if mode is not None:
        check_mode(mode, what)
    return SCHEMES[mode]
