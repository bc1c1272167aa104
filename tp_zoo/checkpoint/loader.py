"""Streaming a checkpoint into per-device shards while the model is built.

The model is built inside `tp_zoo.layers.weights_from(loader)`: as each
variable is created, the loader finds its tensor through the family's
layout map, reads for each device only the slice that device holds, and
hands Keras the finished sharded array. No variable is first initialised at
random, and no whole copy of a sharded tensor is made in host memory: the
file is memory-mapped and each device's block is copied over in chunks of
rows (transposed on the device), so host memory holds one chunk at a time;
devices that hold the same block share one read. Where a variable is padded
for tp (vocab rows, attention heads, MLP units), only the tensor's real
rows are read, each contiguous run into its place in a block of zeros.
"""

import collections
import functools
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from rich.progress import BarColumn
from rich.progress import DownloadColumn
from rich.progress import Progress
from rich.progress import TextColumn
from rich.progress import TimeRemainingColumn
from rich.progress import TransferSpeedColumn

from tp_zoo.errors import CheckpointMismatchError
from tp_zoo.layers.base import scatter_real
from tp_zoo.layers.quantize import int8_values
from tp_zoo.layers.quantize import scale_from_absmax


class StreamingLoader:
    """The weight source for `weights_from`: layout map + tensor files -> shards."""

    def __init__(self, tensors, layout, progress=True, description="loading", float_dtype="float32"):
        self.tensors = tensors
        self.layout = layout
        # The dtype a float kernel would have: int8 kernels are quantized
        # from it, as `quantize("int8")` on the float model would.
        self.float_dtype = jnp.dtype(float_dtype)
        self._scales = {}  # kernel path -> its int8 scale (host), made with the scale variable
        self.used = set()
        self.bytes_read = 0
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            disable=not progress,
            transient=False,
        )
        total = sum(tensors.nbytes(n) for n in tensors.names())
        self._task = self._progress.add_task(description, total=total)

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:  # the tensors left are unused ones (tied heads, buffers)
            self._progress.update(self._task, completed=self._progress.tasks[0].total)
        self._progress.stop()

    # --- the weights_from protocol ---------------------------------------------
    def __call__(self, path, shape, padding, dtype, sharding):
        if path.endswith("/kernel_scale"):
            return self._int8_scale(path[: -len("_scale")], padding, sharding)
        entry, tensor = self.layout.find(path)
        if entry is None:
            raise CheckpointMismatchError(
                f"The {self.layout.family} layout map has no entry for variable {path}."
            )
        name = self.layout.resolve(tensor, self.tensors.names())
        if name is None:
            if entry.optional:
                return None
            raise CheckpointMismatchError(
                f"Checkpoint tensor {tensor} (for variable {path}) is missing from the checkpoint."
            )
        self._check_float(name, path)
        true_shape = tuple(p.true_size for p in padding)
        expected = entry.tensor_shape(true_shape)
        found = self.tensors.shape(name)
        if tuple(found) != tuple(expected):
            raise CheckpointMismatchError(
                f"Checkpoint tensor {name} has shape {tuple(found)}, expected shape "
                f"{tuple(expected)} for variable {path} of shape {tuple(true_shape)}."
            )
        scale = self._scales.pop(path) if jnp.dtype(dtype) == jnp.int8 else None
        value = self._place(entry, name, tuple(shape), padding, dtype, sharding, scale)
        if name not in self.used:
            self.used.add(name)
            self._progress.advance(self._task, self.tensors.nbytes(name))
        return value

    def _check_float(self, name, path):
        """Every weight tp_zoo reads is stored as floats; int8 is made here,
        from them. Integer or float8 weights are another tool's quantization."""
        dtype = self.tensors.dtype(name)
        if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize < 2:
            raise CheckpointMismatchError(
                f"Checkpoint tensor {name} (for variable {path}) is stored as {dtype.name}: an already quantized "
                "checkpoint, in a format tp_zoo does not read. Load the float checkpoint (float32, float16 or "
                "bfloat16), with quantize='int8' for int8 weights."
            )

    def _int8_scale(self, kernel_path, padding, sharding):
        """The per-output-channel scale of an int8 kernel (made before the
        kernel): max |w| over the input dims / 127, read from the mapped file
        in chunks of rows, so no whole tensor is held in host memory."""
        entry, tensor = self.layout.find(kernel_path)
        name = self.layout.resolve(tensor, self.tensors.names()) if entry is not None else None
        if name is None:
            raise CheckpointMismatchError(f"No checkpoint tensor for the int8 kernel {kernel_path}.")
        self._check_float(name, kernel_path)
        host = self.tensors.array(name)
        if entry.part is not None:
            axis, index, count = entry.part
            block = host.shape[axis] // count
            host = host[(slice(None),) * axis + (slice(index * block, (index + 1) * block),)]
        scale_shape = tuple(p.true_size for p in padding)
        rank = entry.variable_rank(host.ndim)
        n_in = rank - len(scale_shape)
        tensor_groups = entry.groups(rank)[::-1] if entry.transposed else entry.groups(rank)
        rows_are_inputs = tensor_groups[0][0] < n_in  # 2-D tensors: one input axis, one output axis
        rows = max(1, _CHUNK_BYTES // max(1, host[:1].nbytes))
        maxima = []
        for start in range(0, host.shape[0], rows):
            chunk = np.abs(np.asarray(host[start : start + rows]).astype(self.float_dtype).astype(np.float32))
            maxima.append(chunk.max(axis=0) if rows_are_inputs else chunk.max(axis=1))
        amax = np.max(maxima, axis=0) if rows_are_inputs else np.concatenate(maxima)
        scale = np.asarray(_scale_from_absmax(amax)).reshape(scale_shape)
        # Padded output channels (vocab, heads, MLP units) get scale 1: they are zeros.
        scale = scatter_real(scale, padding, fill=1.0)
        self._scales[kernel_path] = scale
        return jnp.asarray(scale) if sharding is None else jax.device_put(scale, sharding)

    def _place(self, entry, name, shape, padding, dtype, sharding, scale=None):
        if sharding is None:
            indices = {jax.devices()[0]: tuple(slice(None) for _ in shape)}
        else:
            indices = sharding.addressable_devices_indices_map(shape)
        by_block = collections.defaultdict(list)
        for device, index in indices.items():
            block = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
            by_block[block].append(device)
        shards = []
        for block, devices in by_block.items():
            if scale is None:
                shards += self._read_block(entry, name, block, padding, dtype, devices)
                continue
            # int8: read in the float dtype, quantize on the device with the
            # block's slice of the whole-tensor scale.
            floats = self._read_block(entry, name, block, padding, self.float_dtype, devices)
            out_block = block[len(shape) - scale.ndim :]
            block_scale = scale[tuple(slice(a, b) for a, b in out_block)]
            shards += [_quantize_block(x, jax.device_put(block_scale, x.devices().pop())) for x in floats]
        if sharding is None:
            return shards[0]
        return jax.make_array_from_single_device_arrays(shape, sharding, shards)

    def _read_block(self, entry, name, block, padding, dtype, devices):
        """One block of the variable, read once, placed on each of `devices`:
        its real entries read from the tensor in contiguous runs (a product
        of each dim's runs), zeros at its padding."""
        block_shape = tuple(stop - start for start, stop in block)
        true_shape = tuple(p.true_size for p in padding)
        runs = [p.runs(start, stop) for p, (start, stop) in zip(padding, block)]
        pieces = list(itertools.product(*runs))
        whole = len(pieces) == 1 and all(length == n for (_, length, _), n in zip(pieces[0], block_shape))
        if not whole:
            out = [jnp.zeros(block_shape, dtype, device=device) for device in devices]
        for piece in pieces:
            ranges = [
                None if (first == 0 and length == t) else (first, first + length)
                for (_, length, first), t in zip(piece, true_shape)
            ]
            slices, _ = entry.tensor_slices(self.tensors.shape(name), true_shape, ranges)
            host = self.tensors.array(name)[slices]  # a view of the mapped file: nothing read yet
            self.bytes_read += host.nbytes  # one read, however many devices hold the block
            piece_shape = tuple(length for _, length, _ in piece)
            finish = _finisher(piece_shape, jnp.dtype(host.dtype), jnp.dtype(dtype), in_place=whole)
            values = [finish(_to_device(host, device, entry.transposed)) for device in devices]
            if whole:
                return [x.block_until_ready() for x in values]
            offsets = tuple(offset for offset, _, _ in piece)
            out = [_write_piece(o, x, offsets).block_until_ready() for o, x in zip(out, values)]
        return out

    def unused_tensors(self):
        return sorted(
            n for n in self.tensors.names() if n not in self.used and not self.layout.ignored(n)
        )

    def warn_unused(self):
        unused = self.unused_tensors()
        if unused:
            warnings.warn(
                f"{len(unused)} checkpoint tensors were not used: {', '.join(unused[:8])}"
                + (" ..." if len(unused) > 8 else ""),
                stacklevel=3,
            )


# Host rows are copied to a device this many bytes at a time, so host memory
# holds one chunk, not one device's whole slice, even while transposing.
_CHUNK_BYTES = 32 << 20


def _to_device(host, device, transposed):
    """`host` (or its transpose) on `device`, copied over in row chunks."""
    rows = max(1, _CHUNK_BYTES // max(1, host[:1].nbytes))
    if host.shape[0] <= rows:
        x = jax.device_put(np.ascontiguousarray(host), device)
        return x.T if transposed else x
    out_shape = host.shape[::-1] if transposed else host.shape
    out = jnp.zeros(out_shape, host.dtype, device=device)
    for start in range(0, host.shape[0], rows):
        chunk = jax.device_put(np.ascontiguousarray(host[start : start + rows]), device)
        # Wait for each chunk: with asynchronous dispatch the loop would
        # otherwise queue every chunk's copy at once.
        out = _write_chunk(out, chunk, start, transposed).block_until_ready()
    return out


@functools.partial(jax.jit, donate_argnums=0, static_argnums=3)
def _write_chunk(out, chunk, start, transposed):
    if transposed:
        return jax.lax.dynamic_update_slice_in_dim(out, chunk.T, start, axis=1)
    return jax.lax.dynamic_update_slice_in_dim(out, chunk, start, axis=0)


_scale_from_absmax = jax.jit(scale_from_absmax)


@jax.jit
def _quantize_block(block, scale):
    return int8_values(block.astype(jnp.float32), scale)


@functools.lru_cache(maxsize=None)
def _finisher(shape, source_dtype, dtype, in_place):
    """Reshape to the variable's block (or a run of it) and cast; in place
    when the block is whole and keeps its dtype."""
    finish = lambda x: x.reshape(shape).astype(dtype)
    return jax.jit(finish, donate_argnums=0 if in_place and source_dtype == dtype else ())


@functools.partial(jax.jit, donate_argnums=0, static_argnums=2)
def _write_piece(block, piece, offsets):
    return jax.lax.dynamic_update_slice(block, piece, offsets)
