"""Layout maps: which checkpoint tensor feeds which Keras variable, and how.

A family's layout map (tp_zoo/presets/layouts/<layout>.json) lists entries of
    variable   Keras variable path ("{i}" stands for the layer number)
    tensor     checkpoint tensor name (same "{i}")
    transform  how the tensor's dims become the variable's (TRANSFORMS)
    part       [axis, index, count]: the variable is block `index` of `count`
               equal blocks of the tensor along `axis` (fused q/k/v)
    optional   the tensor may be absent (then the variable is not loaded from it)

It says only where tensors go and how they are transformed: how a variable
is split over the devices, or padded up to a multiple of tp, is the layer's
to declare (`ShardedLayer.add_sharded_weight`), and the loader reads it from
the variable being made.

A transform is a transpose (or not) followed by a reshape of the tensor
into the variable, where `groups` says which variable dims each tensor dim
becomes: (hidden, heads * head_dim) -> (hidden, heads, head_dim) is
[[0], [1, 2]]. From that the slice of the tensor a device needs is derived,
so each device reads only its own part of the file.
"""

import json
import math
import re
from pathlib import Path

# name -> (transpose the tensor first?, groups of variable dims per tensor dim)
TRANSFORMS = {
    "identity": (False, None),
    "transpose": (True, None),
    "linear_to_heads": (True, [[0], [1, 2]]),  # torch Linear (heads*hd, in) -> (in, heads, hd)
    "heads_to_linear": (True, [[0, 1], [2]]),  # torch Linear (out, heads*hd) -> (heads, hd, out)
    "bias_to_heads": (False, [[0, 1]]),  # (heads*hd,) -> (heads, hd)
    "conv1d_to_heads": (False, [[0], [1, 2]]),  # Conv1D (in, heads*hd) -> (in, heads, hd)
    "conv1d_heads_to_linear": (False, [[0, 1], [2]]),  # Conv1D (heads*hd, out) -> (heads, hd, out)
}


def presets_dir():
    """tp_zoo/presets/: the presets and layout maps, data inside the package."""
    return Path(__file__).resolve().parents[1] / "presets"


class LayoutEntry:
    def __init__(self, spec):
        self.variable = spec["variable"]
        self.tensor = spec["tensor"]
        self.transform = spec.get("transform", "identity")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"Layout entry for {self.variable}: unknown transform {self.transform!r}.")
        self.part = spec.get("part")
        self.optional = spec.get("optional", False)
        self._pattern = re.compile("^" + re.escape(self.variable).replace(r"\{i\}", r"(?P<i>\d+)") + "$")

    def match(self, path):
        m = self._pattern.match(path)
        if m is None:
            return None
        return self.tensor.replace("{i}", m.group("i")) if "i" in m.groupdict() else self.tensor

    def variable_rank(self, tensor_rank):
        """How many dims the variable a tensor of `tensor_rank` dims becomes."""
        groups = TRANSFORMS[self.transform][1]
        return tensor_rank if groups is None else sum(len(g) for g in groups)

    def groups(self, rank):
        groups = TRANSFORMS[self.transform][1]
        return groups if groups is not None else [[d] for d in range(rank)]

    @property
    def transposed(self):
        return TRANSFORMS[self.transform][0]

    # --- shapes ---------------------------------------------------------------
    def tensor_shape(self, variable_shape):
        """The checkpoint tensor shape that makes a variable of this (unpadded) shape."""
        shape = [math.prod(variable_shape[d] for d in g) for g in self.groups(len(variable_shape))]
        if self.transposed:
            shape = shape[::-1]
        if self.part is not None:
            axis, _, count = self.part
            shape[axis] *= count
        return tuple(shape)

    def tensor_slices(self, tensor_shape, variable_shape, variable_ranges):
        """Slices of the tensor holding one block of the variable.

        `variable_ranges` has, per dim of the unpadded `variable_shape`,
        None (whole) or (start, stop). Returns (slices of the tensor, shape
        of that block once transposed, before the reshape to the variable).
        """
        ranges = []
        for g in self.groups(len(variable_shape)):
            narrowed = [d for d in g if variable_ranges[d] is not None]
            if not narrowed:
                ranges.append(None)
                continue
            d = narrowed[0]
            if len(narrowed) > 1 or d != g[0]:
                raise ValueError(f"{self.variable}: a split on dim {d} is not contiguous in the tensor.")
            stride = math.prod(variable_shape[e] for e in g[1:])
            start, stop = variable_ranges[d]
            ranges.append((start * stride, stop * stride))
        if self.transposed:
            ranges = ranges[::-1]
        slices = []
        for axis, size in enumerate(tensor_shape):
            lo, hi = 0, size
            if self.part is not None and self.part[0] == axis:
                block = size // self.part[2]
                lo, hi = self.part[1] * block, (self.part[1] + 1) * block
            if ranges[axis] is not None:
                lo, hi = lo + ranges[axis][0], lo + ranges[axis][1]
            slices.append(slice(lo, hi))
        block_shape = [s.stop - s.start for s in slices]
        return tuple(slices), tuple(block_shape[::-1] if self.transposed else block_shape)


class Layout:
    """A family's layout map, loaded from tp_zoo/presets/layouts/<layout>.json."""

    def __init__(self, family):
        path = presets_dir() / "layouts" / f"{family}.json"
        spec = json.loads(path.read_text())
        self.family = family
        self.entries = [LayoutEntry(e) for e in spec["entries"]]
        self.ignore = [re.compile("^" + re.escape(p).replace(r"\{i\}", r"\d+") + "$") for p in spec.get("ignore", [])]
        # Prefixes older checkpoints lack (e.g. "model." in early OPT files).
        self.optional_prefixes = spec.get("optional_prefixes", [])

    def find(self, variable_path):
        """(entry, tensor name) for a variable path, or (None, None)."""
        for entry in self.entries:
            tensor = entry.match(variable_path)
            if tensor is not None:
                return entry, tensor
        return None, None

    def resolve(self, tensor_name, available):
        """The name under which `tensor_name` is stored in `available`, or None."""
        if tensor_name in available:
            return tensor_name
        for prefix in self.optional_prefixes:
            if tensor_name.startswith(prefix) and tensor_name[len(prefix):] in available:
                return tensor_name[len(prefix):]
        return None

    def ignored(self, tensor_name):
        return any(p.match(tensor_name) for p in self.ignore)
