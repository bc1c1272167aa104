"""How a variable's storage relates to the weights it stands for.

A fused variable holds several weights side by side (`Fused`, `Part`); a
variable stored inputs-last (output-major: int8 values) holds a weight of
dims (*in, *out) as (*out, *in). Both are undone for get/set_weights,
export and checkpoints, through the helpers here.
"""

import itertools
import math
import operator
from typing import NamedTuple

import numpy as np


# --- fused variables ----------------------------------------------------------
class Part(NamedTuple):
    """One weight stored inside a fused variable, as a variable of its own
    would be: the fused variable's block [offset, offset + size) along the
    fused axis, reshaped (row-major) to `shape`, is the variable that a
    separate layer named `layer` would hold, of that `shape`, `padding`
    (an `AxisPadding` per dim) and `layout`."""

    layer: str
    size: int
    shape: tuple
    padding: tuple
    layout: tuple


class Fused(NamedTuple):
    """Parts laid side by side along `axis` of one variable (q/k/v, gate/up):
    one product per device where there were several. `axis` is never split
    over devices: each device holds its slice of every part."""

    axis: int
    parts: tuple

    def offsets(self):
        """Where each part starts along `axis`."""
        return list(itertools.accumulate((p.size for p in self.parts[:-1]), initial=0))

    def blocks(self, value):
        """(part, its block of `value` reshaped to the part's shape), in order."""
        for part, offset in zip(self.parts, self.offsets()):
            block = value[(slice(None),) * self.axis + (slice(offset, offset + part.size),)]
            yield part, block.reshape(part.shape)

    def join(self, values, shape):
        """The fused value (numpy) of `shape` from one value per part (parts' shapes)."""
        return np.concatenate([v.reshape(self._slab_shape(p, shape)) for p, v in zip(self.parts, values)], self.axis)

    def in_fused(self, index, box, shape):
        """Where a box of part `index` (a (start, stop) per dim of the part's
        shape) lies in the fused variable of `shape`: one box there too, for
        the boxes the loader writes (ValueError for any other)."""
        part, offset = self.parts[index], self.offsets()[index]
        box = reshaped_box(box, part.shape, self._slab_shape(part, shape))
        start, stop = box[self.axis]
        return box[: self.axis] + ((start + offset, stop + offset),) + box[self.axis + 1 :]

    def in_part(self, index, box, shape):
        """The box of part `index` (as its own variable) that a box of the
        fused variable of `shape` holds (a device's block: all of `axis`)."""
        if box[self.axis] != (0, shape[self.axis]):
            raise ValueError(f"A box of a fused variable is split along its fused axis {self.axis}: {box}.")
        part = self.parts[index]
        slab = box[: self.axis] + ((0, part.size),) + box[self.axis + 1 :]
        return reshaped_box(slab, self._slab_shape(part, shape), part.shape)

    def _slab_shape(self, part, shape):
        """The shape of a part's slab of the fused variable of `shape`."""
        return shape[: self.axis] + (part.size,) + shape[self.axis + 1 :]


def reshaped_box(box, shape, new_shape):
    """A box ((start, stop) per dim) of an array of `shape` as a box of the
    array reshaped (row-major) to `new_shape`. The dims are cut where both
    shapes' leading sizes multiply to the same number; between two cuts the
    box must hold one contiguous range of entries, and that range must be
    one box of the new dims (ValueError otherwise)."""
    sizes = list(itertools.accumulate(shape, operator.mul, initial=1))
    new_sizes = list(itertools.accumulate(new_shape, operator.mul, initial=1))
    cuts = [(sizes.index(n), new_sizes.index(n)) for n in sorted(set(sizes) & set(new_sizes))[1:]]
    cuts[-1:] = [(len(shape), len(new_shape))]  # trailing dims of size 1 end the last run
    new_box, i, j = [], 0, 0
    for next_i, next_j in cuts:
        entries = _flat_range(box[i:next_i], shape[i:next_i])
        run_box = None if entries is None else _range_as_box(*entries, new_shape[j:next_j])
        if run_box is None:
            raise ValueError(f"The box {box} of shape {shape} is no box of shape {new_shape}.")
        new_box += run_box
        i, j = next_i, next_j
    return tuple(new_box)


def _flat_range(box, shape):
    """(first entry, count) of a box of `shape` if it is one row-major range, else None."""
    start, count, stride, whole = 0, 1, 1, True  # whole: the dims inside are all whole
    for (lo, hi), n in reversed(list(zip(box, shape))):
        if hi - lo > 1 and not whole:
            return None
        start, count, stride = start + lo * stride, count * (hi - lo), stride * n
        whole = whole and (lo, hi) == (0, n)
    return start, count


def _range_as_box(start, count, shape):
    """The entries [start, start + count) of `shape` (row-major) as a box, or None."""
    box = []
    for k in range(len(shape)):
        inner = math.prod(shape[k + 1 :])
        if start % inner == 0 and count % inner == 0:
            return box + [(start // inner, (start + count) // inner)] + [(0, n) for n in shape[k + 1 :]]
        if start % inner + count > inner:
            return None
        box.append((start // inner, start // inner + 1))
        start %= inner
    return box


# --- inputs-last (output-major) order -----------------------------------------
def output_major(dims, n_in):
    """A kernel's per-dim entries (*in, *out) -- its shape, layout, paddings
    or axes -- in output-major order: (*out, *in)."""
    return tuple(dims[n_in:]) + tuple(dims[:n_in])


def kernel_order(dims, n_in):
    """Output-major per-dim entries (*out, *in) in the kernel's order (*in, *out)."""
    return output_major(dims, len(dims) - n_in)


def to_output_major(kernel, n_in):
    """A kernel (numpy or jax array) transposed to output-major order (itself for n_in = 0)."""
    return kernel.transpose(output_major(range(kernel.ndim), n_in)) if n_in else kernel


def to_kernel_order(values, n_in):
    """Output-major values (numpy or jax array) transposed to the kernel's order (themselves for n_in = 0)."""
    return values.transpose(kernel_order(range(values.ndim), n_in)) if n_in else values


def output_major_parts(parts, n_in):
    """A fused kernel's `Fused` parts (None: not fused) as its output-major
    values hold them: each part output-major, the fused axis moved with it."""
    if parts is None:
        return None
    turn = lambda p: p._replace(
        shape=output_major(p.shape, n_in), padding=output_major(p.padding, n_in), layout=output_major(p.layout, n_in)
    )
    return parts._replace(axis=parts.axis - n_in, parts=tuple(map(turn, parts.parts)))
