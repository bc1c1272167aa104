"""Streaming a checkpoint into per-device shards while the model is built.

The model is built inside `tp_zoo.layers.weights_from(loader)`: as each
variable is created, the loader finds its tensor through the family's
layout map, reads for each device only the slice that device holds, and
hands Keras the finished sharded array. No variable is first initialised at
random, and no whole copy of a sharded tensor is made in host memory: the
file is memory-mapped and each device's block is copied over in chunks of
rows (transposed on the device). Where a variable is padded for tp (vocab
rows, attention heads, MLP units), only the tensor's real rows are read,
each contiguous run into its place in a block of zeros.

A variable's blocks are copied concurrently, so that every device's link
is busy at once. Each block has a thread that reads its rows a chunk at a
time, once however many devices hold the block; the devices holding it
(several only where the block is replicated) each copy a chunk in a thread
of their own, all at the same time, while the block's thread reads the next
chunk. Host memory thus holds at most two 32 MiB chunks per block, so at
most 64 MiB per device: 128 MiB at tp=2, 512 MiB at tp=8 (jax may keep a
copied chunk a little longer, until its next call). A chunk of rows that are
contiguous in the file is not even that: it is a view of the mapped file.
"""

import collections
import concurrent.futures
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
from tp_zoo.layers.quantize import kernel_order
from tp_zoo.layers.quantize import scale_from_absmax
from tp_zoo.layers.quantize import to_output_major


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
        # Threads that copy a variable's blocks concurrently (one per block)
        # and, for each block, a chunk of rows to its devices (one per device).
        self._blocks = concurrent.futures.ThreadPoolExecutor(len(jax.local_devices()), "tp_zoo-block")
        self._copies = concurrent.futures.ThreadPoolExecutor(len(jax.local_devices()), "tp_zoo-copy")
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
        # An error raised in a thread (as it was, by `Future.result`) leaves
        # the `with` only once every block and copy has ended.
        self._blocks.shutdown()
        self._copies.shutdown()

    # --- the weights_from protocol ---------------------------------------------
    def __call__(self, path, shape, padding, dtype, sharding):
        if path.endswith("/kernel_scale"):
            return self._int8_scale(path[: -len("_scale")], padding, sharding)
        if jnp.dtype(dtype) == jnp.int8:
            return self._int8_values(path, shape, padding, sharding)
        return self._read(path, shape, padding, dtype, sharding)

    def _read(self, path, shape, padding, dtype, sharding, scale=None):
        """The variable's value from its tensor; int8 quantized from the
        float blocks with the kernel's `scale`."""
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

    def _int8_values(self, path, shape, padding, sharding):
        """An int8 kernel's values, stored output-major (*out, *in): read and
        quantized block by block in the kernel's order (the layout map's),
        then each device's block transposed on its device."""
        scale = self._scales.pop(path)
        n_in = len(shape) - scale.ndim
        kernel_sharding = None
        if sharding is not None:
            kernel_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
                *kernel_order(sharding.spec, n_in)))
        kernel = self._read(
            path, kernel_order(shape, n_in), kernel_order(padding, n_in), jnp.int8, kernel_sharding, scale
        )
        return _output_major(n_in, sharding)(kernel)

    def _place(self, entry, name, shape, padding, dtype, sharding, scale=None):
        if sharding is None:
            indices = {jax.devices()[0]: tuple(slice(None) for _ in shape)}
        else:
            indices = sharding.addressable_devices_indices_map(shape)
        by_block = collections.defaultdict(list)
        for device, index in indices.items():
            block = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
            by_block[block].append(device)
        # int8: read in the float dtype, quantize on the device with the
        # block's slice of the whole-tensor scale.
        read_dtype = self.float_dtype if scale is not None else dtype
        pieces = {block: self._pieces(entry, name, block, padding) for block in by_block}
        jobs = [
            self._blocks.submit(self._copy_block, pieces[block], block, read_dtype, devices, entry.transposed)
            for block, devices in by_block.items()
        ]
        shards = []
        for block, job in zip(by_block, jobs):
            floats = job.result()
            if scale is None:
                shards += floats
                continue
            out_block = block[len(shape) - scale.ndim :]
            block_scale = scale[tuple(slice(a, b) for a, b in out_block)]
            shards += [_quantize_block(x, jax.device_put(block_scale, x.devices().pop())) for x in floats]
        if sharding is None:
            return shards[0]
        return jax.make_array_from_single_device_arrays(shape, sharding, shards)

    def _pieces(self, entry, name, block, padding):
        """What one block of the variable reads: its real entries as a
        product of each dim's contiguous runs, each a (view of the mapped
        tensor, offset in the block, shape in the block)."""
        true_shape = tuple(p.true_size for p in padding)
        runs = [p.runs(start, stop) for p, (start, stop) in zip(padding, block)]
        pieces = []
        for piece in itertools.product(*runs):
            ranges = [
                None if (first == 0 and length == t) else (first, first + length)
                for (_, length, first), t in zip(piece, true_shape)
            ]
            slices, _ = entry.tensor_slices(self.tensors.shape(name), true_shape, ranges)
            host = self.tensors.array(name)[slices]  # a view of the mapped file: nothing read yet
            self.bytes_read += host.nbytes  # one read, however many devices hold the block
            pieces.append((host, tuple(offset for offset, _, _ in piece), tuple(length for _, length, _ in piece)))
        return pieces

    def _copy_block(self, pieces, block, dtype, devices, transposed):
        """One block of the variable on each of `devices` (run in a thread of
        its own): its pieces, each read once, zeros at its padding."""
        block_shape = tuple(stop - start for start, stop in block)
        whole = len(pieces) == 1 and pieces[0][2] == block_shape
        if not whole:
            out = [_zeros(block_shape, dtype, device) for device in devices]
        for host, offsets, piece_shape in pieces:
            finish = _finisher(piece_shape, jnp.dtype(host.dtype), jnp.dtype(dtype), in_place=whole)
            values = [finish(x) for x in self._to_devices(host, devices, transposed)]
            if whole:
                return jax.block_until_ready(values)
            out = jax.block_until_ready([_write_piece(o, x, offsets) for o, x in zip(out, values)])
        return out

    def _to_devices(self, host, devices, transposed):
        """`host` (or its transpose) on each of `devices`, read in row chunks,
        each chunk once: the devices copy a chunk concurrently while the
        next one is read."""
        rows = max(1, _CHUNK_BYTES // max(1, host[:1].nbytes))
        if host.shape[0] <= rows:
            chunk = np.ascontiguousarray(host)
            puts = [self._copies.submit(_put, chunk, device, transposed) for device in devices]
            return [f.result() for f in puts]
        out_shape = host.shape[::-1] if transposed else host.shape
        out = [_zeros(out_shape, host.dtype, device) for device in devices]
        copies = None
        for start in range(0, host.shape[0], rows):
            chunk = np.ascontiguousarray(host[start : start + rows])  # read while the last chunk is copied
            if copies is not None:
                # This chunk's copies write into the last one's results; and
                # waiting for them holds host memory to these two chunks.
                out = [f.result() for f in copies]
            copies = [self._copies.submit(_copy_chunk, o, chunk, start, d, transposed) for o, d in zip(out, devices)]
        return [f.result() for f in copies]

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


# Host rows are copied to the devices this many bytes at a time, so host
# memory holds two chunks per block, not a block's whole slice, even while
# transposing.
_CHUNK_BYTES = 32 << 20


def _zeros(shape, dtype, device):
    """Zeros made on `device` itself: `jnp.zeros(device=...)` makes them on
    the default device and copies them over (a whole block's transient and
    transfer for every other device)."""
    with jax.default_device(device):
        return jnp.zeros(shape, dtype)


def _put(host, device, transposed):
    """`host` (or its transpose) on `device`: a piece that is one chunk."""
    x = jax.device_put(host, device)
    return (x.T if transposed else x).block_until_ready()


def _copy_chunk(out, chunk, start, device, transposed):
    """`chunk` written into `out` (on `device`) from row `start` (a column if transposed)."""
    x = jax.device_put(chunk, device)
    # Done only once the device holds the chunk, so that a block's thread
    # waiting for its copies knows the host rows are free (asynchronous
    # dispatch would otherwise queue every chunk's copy at once).
    return _write_chunk(out, x, start, transposed).block_until_ready()


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
def _output_major(n_in, sharding):
    """int8 values in the kernel's order -> output-major, placed as
    `sharding` says (each device turns its own block)."""
    return jax.jit(functools.partial(to_output_major, n_in=n_in), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _finisher(shape, source_dtype, dtype, in_place):
    """Reshape to the variable's block (or a run of it) and cast; in place
    when the block is whole and keeps its dtype."""
    finish = lambda x: x.reshape(shape).astype(dtype)
    return jax.jit(finish, donate_argnums=0 if in_place and source_dtype == dtype else ())


@functools.partial(jax.jit, donate_argnums=0, static_argnums=2)
def _write_piece(block, piece, offsets):
    return jax.lax.dynamic_update_slice(block, piece, offsets)
