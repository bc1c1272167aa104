"""Reading tensors from safetensors files without loading them whole.

A file is memory-mapped and its header checked against the file size up
front (a truncated or corrupt file fails before anything is placed on a
device). A tensor is then a zero-copy numpy view into the map; slicing it
touches only the pages of the slice. bfloat16 and float8 come from
ml_dtypes, which numpy alone lacks.
"""

import json
import mmap
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

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
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CorruptCheckpointError(f"{self.path}: truncated or corrupt safetensors file (no header).")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise CorruptCheckpointError(
                    f"{self.path}: truncated or corrupt safetensors file "
                    f"(header of {header_len} bytes in a file of {size})."
                )
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise CorruptCheckpointError(f"{self.path}: corrupt safetensors header ({error}).") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self.tensors = {}
        for name, info in header.items():
            dtype = DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CorruptCheckpointError(f"{self.path}: tensor {name} has unknown dtype {info.get('dtype')!r}.")
            start, end = info["data_offsets"]
            shape = tuple(info["shape"])
            if end > data_size:
                raise CorruptCheckpointError(
                    f"{self.path}: truncated or corrupt safetensors file: tensor {name} "
                    f"ends at byte {end} of a {data_size}-byte data section."
                )
            if end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
                raise CorruptCheckpointError(
                    f"{self.path}: corrupt safetensors file: tensor {name} has {end - start} bytes "
                    f"for shape {shape} of {info['dtype']}."
                )
            self.tensors[name] = (shape, np.dtype(dtype), start)
        self._map = None

    def array(self, name):
        """A read-only numpy view of the tensor, backed by the file's pages."""
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        shape, dtype, start = self.tensors[name]
        count = int(np.prod(shape))
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=self._data_start + start).reshape(shape)

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
        shape, dtype, _ = self.location[name].tensors[name]
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
