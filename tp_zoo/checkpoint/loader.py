"""Streaming a checkpoint into per-device shards while the model is built.

The model is built inside `tp_zoo.layers.weights_from(loader)`: as each
variable is created, the loader finds its tensor through the family's
layout map, reads for each device only the slice that device holds, and
hands Keras the finished sharded array. No variable is first initialised at
random, and no whole copy of a sharded tensor is made in host memory: the
file is memory-mapped and each device's block is copied over in chunks of
rows (transposed on the device), so host memory holds one chunk at a time;
devices that hold the same block share one read.
"""

import collections
import functools
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


class StreamingLoader:
    """The weight source for `weights_from`: layout map + tensor files -> shards."""

    def __init__(self, tensors, layout, progress=True, description="loading"):
        self.tensors = tensors
        self.layout = layout
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
    def __call__(self, path, shape, true_shape, dtype, sharding):
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
        expected = entry.tensor_shape(true_shape)
        found = self.tensors.shape(name)
        if tuple(found) != tuple(expected):
            raise CheckpointMismatchError(
                f"Checkpoint tensor {name} has shape {tuple(found)}, expected shape "
                f"{tuple(expected)} for variable {path} of shape {tuple(true_shape)}."
            )
        value = self._place(entry, name, tuple(shape), true_shape, dtype, sharding)
        if name not in self.used:
            self.used.add(name)
            self._progress.advance(self._task, self.tensors.nbytes(name))
        return value

    def _place(self, entry, name, shape, true_shape, dtype, sharding):
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
            shards += self._read_block(entry, name, block, shape, true_shape, dtype, devices)
        if sharding is None:
            return shards[0]
        return jax.make_array_from_single_device_arrays(shape, sharding, shards)

    def _read_block(self, entry, name, block, shape, true_shape, dtype, devices):
        """One block of the variable, read once, placed on each of `devices`."""
        local_shape = [stop - start for start, stop in block]
        ranges, pad = [], None
        for d, (start, stop) in enumerate(block):
            true_stop = min(stop, true_shape[d])
            if true_stop < stop:
                pad = (d, stop - max(true_stop, start))
                local_shape[d] -= pad[1]
            full = start == 0 and true_stop == true_shape[d]
            ranges.append(None if full else (start, max(true_stop, start)))
        padded_shape = tuple(stop - start for start, stop in block)
        if min(local_shape) == 0:  # a block of padding rows only
            return [jnp.zeros(padded_shape, dtype, device=device) for device in devices]
        slices, _ = entry.tensor_slices(self.tensors.shape(name), true_shape, ranges)
        host = self.tensors.array(name)[slices]  # a view of the mapped file: nothing read yet
        self.bytes_read += host.nbytes  # one read, however many devices hold the block
        finish = _finisher(tuple(local_shape), padded_shape, pad, jnp.dtype(host.dtype), jnp.dtype(dtype))
        return [finish(_to_device(host, device, entry.transposed)).block_until_ready() for device in devices]

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


@functools.lru_cache(maxsize=None)
def _finisher(local_shape, padded_shape, pad, source_dtype, dtype):
    """Reshape to the variable's block, cast, and pad the vocab; in place when
    the block keeps its size (no cast, no padding)."""

    def finish(x):
        x = x.reshape(local_shape).astype(dtype)
        if pad is not None:
            widths = [(0, 0)] * len(local_shape)
            widths[pad[0]] = (0, pad[1])
            x = jnp.pad(x, widths)
        return x

    in_place = pad is None and source_dtype == dtype
    return jax.jit(finish, donate_argnums=0 if in_place else ())
