"""Reading and writing safetensors files without holding them whole.

Opening a file through the `safetensors` library checks its header against
the file size (a truncated or corrupt file fails before anything is placed
on a device) and gives each tensor's shape and dtype. A tensor is then a
zero-copy numpy view into a memory map of the file; slicing it touches
only the pages of the slice. bfloat16 and float8 come from ml_dtypes,
which numpy alone lacks.

The views are not safetensors' own slices (`get_slice(name)[...]`): those
copy each slice into a new buffer while holding the GIL, so the loader's
threads would read their chunks one at a time, each a copy even where its
rows are contiguous in the file (on the CPU, bench_load.py's peak extra
host memory went from 20 to 87 MiB at tp=1, over the loader's 64 MiB bound).
"""

import itertools
import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError
from safetensors import safe_open

from tp_zoo.errors import CheckpointMismatchError
from tp_zoo.errors import CorruptCheckpointError

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """One .safetensors file: tensor names, shapes, and lazy views."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with safe_open(self.path, framework="numpy") as file:
                slices = [(name, file.get_slice(name)) for name in file.offset_keys()]
        except SafetensorError as error:
            raise CorruptCheckpointError(f"{self.path}: truncated or corrupt safetensors file ({error}).") from None
        self.tensors = {}
        for name, tensor in slices:
            dtype = DTYPES.get(tensor.get_dtype())
            if dtype is None:
                raise CheckpointMismatchError(
                    f"{self.path}: tensor {name} is stored as {tensor.get_dtype()}, a dtype tp_zoo does not read."
                )
            self.tensors[name] = (tuple(tensor.get_shape()), np.dtype(dtype))
        # safetensors has checked that the tensors lie in offset order, with no
        # gap, up to the end of the file: that gives where each one starts.
        sizes = [int(np.prod(shape)) * dtype.itemsize for shape, dtype in self.tensors.values()]
        starts = itertools.accumulate(sizes, initial=self.path.stat().st_size - sum(sizes))
        self._starts = dict(zip(self.tensors, starts))
        self._map = None

    def array(self, name):
        """A read-only numpy view of the tensor, backed by the file's pages."""
        if self._map is None:
            self._map = np.memmap(self.path, mode="r")
        shape, dtype = self.tensors[name]
        count = int(np.prod(shape))
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=self._starts[name]).reshape(shape)

    def close(self):
        # Views into the map may still be alive (jax may hold none: it copies),
        # so let the map be closed by the garbage collector with them.
        self._map = None


class TensorFiles:
    """All tensors of a checkpoint, over one or several safetensors files."""

    def __init__(self, files):
        self.files = files
        self.location = {}
        for file in files:
            for name in file.tensors:
                self.location[name] = file

    @classmethod
    def from_directory(cls, directory):
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.exists():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            paths = [directory / n for n in names]
            missing = [str(p) for p in paths if not p.exists()]
            if missing:
                raise FileNotFoundError(f"Checkpoint index names files that are missing: {', '.join(missing)}")
        else:
            paths = sorted(directory.glob("*.safetensors"))
        return cls([SafetensorsFile(p) for p in paths])

    def __contains__(self, name):
        return name in self.location

    def shape(self, name):
        return self.location[name].tensors[name][0]

    def dtype(self, name):
        return self.location[name].tensors[name][1]

    def nbytes(self, name):
        shape, dtype = self.location[name].tensors[name]
        return int(np.prod(shape)) * dtype.itemsize

    def array(self, name):
        return self.location[name].array(name)

    def names(self):
        return self.location.keys()

    def close(self):
        for file in self.files:
            file.close()


class InMemoryTensors(TensorFiles):
    """Tensors already in host memory (the opt-in path for pickled checkpoints)."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.files = []
        self.location = {name: None for name in arrays}

    def shape(self, name):
        return tuple(self.arrays[name].shape)

    def dtype(self, name):
        return self.arrays[name].dtype

    def nbytes(self, name):
        return self.arrays[name].nbytes

    def array(self, name):
        return self.arrays[name]


def write_safetensors(path, tensors):
    """Writes (name, array) pairs to the safetensors file `path`, holding one
    array in host memory at a time: each goes to a scratch file as it comes,
    and safetensors writes the file from a memory map of that (the header,
    which comes first, needs every tensor). Written to a temporary name and
    renamed at the end, so an interrupted write leaves no file that looks
    complete."""
    scratch = path.with_name(path.name + ".data.tmp")
    tmp = path.with_name(path.name + ".tmp")
    placed = []
    try:
        with open(scratch, "wb") as f:
            for name, value in tensors:
                placed.append((name, value.dtype, value.shape, f.tell()))
                f.write(value.tobytes())
        # An empty file cannot be mapped (a file of tensors that are all empty).
        data = np.memmap(scratch, mode="r") if scratch.stat().st_size else np.zeros(0, np.uint8)
        arrays = {
            name: np.frombuffer(data, dtype, int(np.prod(shape)), offset).reshape(shape)
            for name, dtype, shape, offset in placed
        }
        safetensors.numpy.save_file(arrays, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        for leftover in (scratch, tmp):
            leftover.unlink(missing_ok=True)
