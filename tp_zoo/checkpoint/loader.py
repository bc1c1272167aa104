"""Streaming a checkpoint into per-device shards while the model is built.

The model is built inside `tp_zoo.layers.weights_from(loader)`: as each
variable is created, the loader finds its tensor through the family's
layout map, reads for each device only the slice that device holds, and
hands Keras the finished sharded array. No variable is first initialised at
random, and no whole copy of a sharded tensor is made in host memory: the
file is memory-mapped and each device's block is copied over in chunks of
rows, each written (transposed on the device) straight into its place in
the block, a block of zeros made once on the device: no other copy of the
block is made. Where a variable is padded for tp (vocab rows, attention
heads, MLP units), only the tensor's real rows are read, each contiguous
run into its place. A fused variable (q/k/v, gate/up) reads each part from
its own tensor, as the separate variable it stands for, into its place
among the others. A quantized kernel (quantize="int8") is read the same
way, in the float dtype, straight into blocks in its values' order
(output-major for int8, where a torch Linear weight's rows need no
transpose), each block then quantized on its device by the layer's
quantization scheme, with the statistic (int8's scales) the scheme made
first from the whole tensor.

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
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from rich.progress import BarColumn
from rich.progress import DownloadColumn
from rich.progress import Progress
from rich.progress import TextColumn
from rich.progress import TimeRemainingColumn
from rich.progress import TransferSpeedColumn

from tp_zoo.checkpoint.layout import LayoutEntry
from tp_zoo.errors import CheckpointMismatchError
from tp_zoo.layers.base import part_path
from tp_zoo.layers.base import scatter_real
from tp_zoo.layers.storage import kernel_order
from tp_zoo.layers.storage import output_major
from tp_zoo.layers.storage import reshaped_box


class _Tensor(NamedTuple):
    """A checkpoint tensor that a variable reads: the whole variable, or its
    part number `part` (of the variable's `Fused` parts), read as the
    variable of `padding` that the part stands for (the layout map's
    variable: for int8 values, the kernel, in the kernel's order)."""

    entry: LayoutEntry
    name: str
    padding: tuple
    part: int | None


class StreamingLoader:
    """The weight source for `weights_from`: layout map + tensor files -> shards."""

    def __init__(self, tensors, layout, progress=True, description="loading", float_dtype="float32"):
        self.tensors = tensors
        self.layout = layout
        # The dtype a float kernel would have: int8 kernels are quantized
        # from it, as `quantize("int8")` on the float model would.
        self.float_dtype = jnp.dtype(float_dtype)
        # kernel path -> its quantization statistic (host: int8's scales),
        # made with the statistic's variable, kept for the kernel's values.
        self._statistics = {}
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
    def __call__(self, path, shape, padding, dtype, sharding, parts=None, from_kernel=None):
        if from_kernel is not None and from_kernel.role == "statistic":
            return self._statistic(path, from_kernel, sharding)
        # A fused variable's parts are read as the variables they stand for.
        views = [(path, padding)] if parts is None else [(part_path(path, p), p.padding) for p in parts.parts]
        # A quantized kernel's values may be output-major (int8), their last
        # `inputs_last` dims the kernel's first: their tensors are found and
        # read as the kernel's (the layout map's variable), into blocks in
        # the values' order, each then quantized on its device.
        inputs_last, quantize = 0, None
        if from_kernel is not None:
            statistic = self._statistics.pop(path, None)
            inputs_last = from_kernel.inputs_last
            quantize = lambda x, block: from_kernel.scheme.quantize_block(x, statistic, block)
        views = [(view, kernel_order(view_padding, inputs_last)) for view, view_padding in views]
        found = [self._find(*view) for view in views]
        if all(f is None for f in found):
            return None
        if any(f is None for f in found):
            raise CheckpointMismatchError(
                f"{path} joins {[view for view, _ in views]}, but the checkpoint has no tensor for "
                f"{[view for (view, _), f in zip(views, found) if f is None]}: all of them or none are needed."
            )
        tensors = [
            _Tensor(entry, name, view_padding, None if parts is None else index)
            for index, ((entry, name), (_, view_padding)) in enumerate(zip(found, views))
        ]
        value = self._place(tensors, parts, tuple(shape), dtype, sharding, inputs_last, quantize)
        for tensor in tensors:
            if tensor.name not in self.used:
                self.used.add(tensor.name)
                self._progress.advance(self._task, self.tensors.nbytes(tensor.name))
        return value

    def _statistic(self, path, from_kernel, sharding):
        """A quantization scheme's statistic variable (made before the values,
        which it is kept for) from the float kernel's max |w| per output
        channel, each part of a fused kernel from its own tensor."""
        kernel_path = f"{path.rsplit('/', 1)[0]}/kernel"
        out_parts = from_kernel.out_parts
        if out_parts is None:
            views = [(kernel_path, from_kernel.out_padding)]
        else:
            views = [(part_path(kernel_path, p), p.padding) for p in out_parts.parts]
        maxima = [self._channel_absmax(view, view_padding) for view, view_padding in views]
        out_shape = tuple(p.size for p in from_kernel.out_padding)
        amax = maxima[0] if out_parts is None else out_parts.join(maxima, out_shape)
        statistic = self._statistics[kernel_path] = from_kernel.scheme.statistic(amax)
        return jnp.asarray(statistic) if sharding is None else jax.device_put(statistic, sharding)

    def _find(self, path, padding):
        """(layout entry, checkpoint tensor name) of the variable at `path`,
        checked against its true shape; None for an optional tensor absent."""
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
        return entry, name

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

    def _channel_absmax(self, kernel_path, padding):
        """A float kernel's max |w| over its input dims, per output channel
        (float32, host; `padding` that of the output dims, 0 at it), read
        from the mapped file in chunks of rows, so no whole tensor is held
        in host memory."""
        entry, tensor = self.layout.find(kernel_path)
        name = self.layout.resolve(tensor, self.tensors.names()) if entry is not None else None
        if name is None:
            raise CheckpointMismatchError(f"No checkpoint tensor for the quantized kernel {kernel_path}.")
        self._check_float(name, kernel_path)
        host = self.tensors.array(name)
        if entry.part is not None:
            axis, index, count = entry.part
            block = host.shape[axis] // count
            host = host[(slice(None),) * axis + (slice(index * block, (index + 1) * block),)]
        out_shape = tuple(p.true_size for p in padding)
        rank = entry.variable_rank(host.ndim)
        n_in = rank - len(out_shape)
        rows_are_inputs = _tensor_groups(entry, rank)[0][0] < n_in  # 2-D tensors: one input axis, one output axis
        rows = max(1, _CHUNK_BYTES // max(1, host[:1].nbytes))
        maxima = []
        for start in range(0, host.shape[0], rows):
            chunk = np.abs(np.asarray(host[start : start + rows]).astype(self.float_dtype).astype(np.float32))
            maxima.append(chunk.max(axis=0) if rows_are_inputs else chunk.max(axis=1))
        amax = np.max(maxima, axis=0) if rows_are_inputs else np.concatenate(maxima)
        return scatter_real(amax.reshape(out_shape), padding)

    def _place(self, tensors, parts, shape, dtype, sharding, inputs_last, quantize):
        if sharding is None:
            indices = {jax.devices()[0]: tuple(slice(None) for _ in shape)}
        else:
            indices = sharding.addressable_devices_indices_map(shape)
        by_block = collections.defaultdict(list)
        for device, index in indices.items():
            block = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
            by_block[block].append(device)
        # Quantized: read in the float dtype, in the values' order, each
        # block quantized on its device (`quantize(block, box)`).
        read_dtype = self.float_dtype if quantize is not None else dtype
        jobs = [
            self._blocks.submit(
                self._copy_block, self._chunks(tensors, parts, block, shape, inputs_last), block, read_dtype, devices
            )
            for block, devices in by_block.items()
        ]
        shards = []
        for block, job in zip(by_block, jobs):
            floats = job.result()
            shards += floats if quantize is None else [quantize(x, block) for x in floats]
        if sharding is None:
            return shards[0]
        return jax.make_array_from_single_device_arrays(shape, sharding, shards)

    def _chunks(self, tensors, parts, block, shape, inputs_last):
        """What one block of the variable (of `shape`; `parts` its `Fused`
        parts, or None; its last `inputs_last` dims the kernel's first, for
        int8 values) reads, in chunks of rows, each straight into its place
        in the block: (view of the mapped tensor, axes that turn its dims
        into the block's order or None, start in the block, shape there)."""
        chunks = []
        for tensor in tensors:
            own_block = block if parts is None else parts.in_part(tensor.part, block, shape)
            axes = _tensor_axes(tensor.entry, len(own_block), inputs_last)
            # The pieces are of the layout map's variable: the kernel, for int8 values.
            for host, piece_start, piece_shape in self._pieces(tensor, kernel_order(own_block, inputs_last)):
                host_shape, rows_axis = host.shape, 0
                if axes is not None:
                    host_shape, rows_axis = tuple(host.shape[a] for a in axes), axes.index(0)
                rows = _chunk_rows(host[:1].nbytes, _row_stride(tensor.entry, piece_shape))
                piece_shape, starts = output_major(piece_shape, inputs_last), output_major(piece_start, inputs_last)
                for first in range(0, host.shape[0], rows):
                    last = min(first + rows, host.shape[0])
                    in_host = [(first, last) if axis == rows_axis else (0, n) for axis, n in enumerate(host_shape)]
                    in_piece = reshaped_box(in_host, host_shape, piece_shape)
                    box = tuple((a + s, b + s) for (a, b), s in zip(in_piece, starts))
                    if parts is not None:
                        box = parts.in_fused(tensor.part, box, shape)
                    start = tuple(a - s for (a, _), (s, _) in zip(box, block))
                    chunks.append((host[first:last], axes, start, tuple(b - a for a, b in box)))
        return chunks

    def _pieces(self, tensor, block):
        """What a block of a tensor's variable reads: its real entries as a
        product of each dim's contiguous runs, each a (view of the mapped
        tensor, start in the variable, shape)."""
        true_shape = tuple(p.true_size for p in tensor.padding)
        runs = [p.runs(start, stop) for p, (start, stop) in zip(tensor.padding, block)]
        pieces = []
        for piece in itertools.product(*runs):
            ranges = [
                None if (first == 0 and length == t) else (first, first + length)
                for (_, length, first), t in zip(piece, true_shape)
            ]
            slices, _ = tensor.entry.tensor_slices(self.tensors.shape(tensor.name), true_shape, ranges)
            host = self.tensors.array(tensor.name)[slices]  # a view of the mapped file: nothing read yet
            self.bytes_read += host.nbytes  # one read, however many devices hold the block
            start = tuple(start + offset for (start, _), (offset, _, _) in zip(block, piece))
            pieces.append((host, start, tuple(length for _, length, _ in piece)))
        return pieces

    def _copy_block(self, chunks, block, dtype, devices):
        """One block of the variable on each of `devices` (run in a thread of
        its own): zeros, each chunk of rows written into its place, read once
        while the devices copy the last one concurrently."""
        out = [_zeros(tuple(stop - start for start, stop in block), dtype, device) for device in devices]
        copies = []
        for host, axes, start, shape in chunks:
            chunk = np.ascontiguousarray(host)  # read while the last chunk is copied
            if copies:
                # This chunk's copies write into the last one's results; and
                # waiting for them holds host memory to these two chunks.
                out = [f.result() for f in copies]
            copies = [
                self._copies.submit(_copy_chunk, o, chunk, start, shape, d, axes) for o, d in zip(out, devices)
            ]
        return [f.result() for f in copies] if copies else out

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
    transfer for every other device). Committed to `device` (no copy), as
    the chunks written into them are: else the first write into a block
    compiles once more than the others."""
    with jax.default_device(device):
        return jax.device_put(jnp.zeros(shape, dtype), device)


def _chunk_rows(row_bytes, stride):
    """Rows per chunk: as many as _CHUNK_BYTES holds, in whole multiples of
    `stride` (the rows per entry of the variable dim they become) or else a
    divisor of it, so that every chunk is one box of the variable."""
    rows = max(1, _CHUNK_BYTES // max(1, row_bytes))
    return rows - rows % stride if rows >= stride else math.gcd(rows, stride)


def _tensor_groups(entry, rank):
    """The variable dims (of a variable of `rank` dims) that each of the
    tensor's dims becomes, in the tensor's order."""
    groups = entry.groups(rank)
    return groups[::-1] if entry.transposed else groups


def _row_stride(entry, shape):
    """The tensor's rows per entry of the first variable dim its rows become
    (the variable, or its block, of `shape`): head_dim for (heads * head_dim, hidden)."""
    return math.prod(shape[d] for d in _tensor_groups(entry, len(shape))[0][1:])


def _tensor_axes(entry, rank, inputs_last):
    """The axes that turn a tensor's dims into the order of its variable (of
    `rank` dims) as stored: the kernel's (the layout map's), or output-major
    for int8 values (the last `inputs_last` dims the kernel's first). None
    where the tensor has them in that order already (output-major int8 of
    a torch Linear weight)."""
    tensor_groups = _tensor_groups(entry, rank)
    stored = output_major(range(rank), inputs_last)
    axes = tuple(sorted(range(len(tensor_groups)), key=lambda t: stored.index(tensor_groups[t][0])))
    if [d for a in axes for d in tensor_groups[a]] != list(stored):
        raise ValueError(f"{entry.variable}: a tensor dim holds both input and output dims of an int8 kernel.")
    return None if axes == tuple(range(len(axes))) else axes


def _copy_chunk(out, chunk, start, shape, device, axes):
    """`chunk` (its dims turned by `axes`, unless None) as a box of `shape`,
    written into `out` (on `device`) at `start`."""
    x = jax.device_put(chunk, device)
    if axes is not None:
        # A transpose of its own: XLA fuses one into the write, where it is
        # copied entry by entry (twice as slow on a CPU).
        x = _transpose(x, axes)
    # Done only once the device holds the chunk, so that a block's thread
    # waiting for its copies knows the host rows are free (asynchronous
    # dispatch would otherwise queue every chunk's copy at once).
    return _write_chunk(out, x, np.asarray(start, np.int32), shape).block_until_ready()


_transpose = jax.jit(jnp.transpose, static_argnums=1)
_bitcast = jax.lax.bitcast_convert_type


@functools.partial(jax.jit, donate_argnums=0, static_argnums=3)
def _write_chunk(out, chunk, start, shape):
    chunk = chunk.reshape(shape).astype(out.dtype)
    # Written as unsigned ints of the same width: XLA on a CPU writes
    # bfloat16 entries one by one through float32, three times slower.
    bits = jnp.dtype(f"uint{8 * out.dtype.itemsize}")
    written = jax.lax.dynamic_update_slice(_bitcast(out, bits), _bitcast(chunk, bits), tuple(start))
    return _bitcast(written, out.dtype)

