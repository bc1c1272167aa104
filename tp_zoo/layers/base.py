"""What every sharded layer shares: finding the mesh and making its variables."""

import contextlib
import contextvars
from typing import NamedTuple

import jax
import jax.numpy as jnp
import keras
import numpy as np
from keras.src.backend.common.name_scope import current_path

from tp_zoo import parallel
from tp_zoo.errors import ShardingError
from tp_zoo.layers.storage import kernel_order
from tp_zoo.layers.storage import to_kernel_order
from tp_zoo.layers.storage import to_output_major

_weight_source = contextvars.ContextVar("tp_zoo_weight_source", default=None)


@contextlib.contextmanager
def weights_from(source):
    """Variables made in this scope take their values from `source`.

    `source(path, shape, padding, dtype, sharding, parts, from_kernel)` returns the
    variable's value as a global array of `shape` already placed on the
    devices (`sharding` is None when no mesh is active; `padding` has one
    `AxisPadding` per dim, saying where that dim's real entries sit among
    its tp padding), or None to fall back to the layer's initializer. This
    is how checkpoints stream into shards: no variable is first filled at
    random and then overwritten. `parts` (a `Fused`, or None) makes the
    variable of parts, each standing for the variable a separate layer
    would have had (at `part_path`): the source writes each into its place.
    `from_kernel` (a quantization scheme's `FromKernel`, or None) marks a
    variable made from the float kernel's tensors instead of one of its own.
    """
    token = _weight_source.set(source)
    try:
        yield
    finally:
        _weight_source.reset(token)


def valid_tp_values(*sizes):
    """tp values up to 64 that divide every size (for error messages)."""
    return [t for t in range(1, 65) if all(s % t == 0 for s in sizes)]


def check_divisible(layer_name, what, size, tp, why=""):
    if size % tp:
        raise ShardingError(
            f"{layer_name}: {what} = {size} is not divisible by tp={tp}{why}. "
            f"tp values that would work: {valid_tp_values(size)}."
        )


def round_up(size, tp):
    return -(-size // tp) * tp


class AxisPadding(NamedTuple):
    """Where the real entries of one dim sit among inert zero padding.

    The dim is `padded_groups` groups of `padded_group_size` entries; the
    first `groups` of them hold `group_size` real entries each, at their
    start. Trailing padding (a vocab padded to a multiple of tp) is one
    group; attention pads inside each kv group, so that each real query
    head stays with its own key/value head.
    """

    groups: int
    padded_groups: int
    group_size: int
    padded_group_size: int

    @classmethod
    def trailing(cls, true_size, size):
        return cls(1, 1, int(true_size), int(size))

    @property
    def size(self):
        return self.padded_groups * self.padded_group_size

    @property
    def true_size(self):
        return self.groups * self.group_size

    @property
    def is_padded(self):
        return self.size != self.true_size

    def positions(self):
        """The padded index of each real entry, in order."""
        starts = np.arange(self.groups) * self.padded_group_size
        return (starts[:, None] + np.arange(self.group_size)).ravel()

    def real_index(self):
        """(size,): each padded index's index among the real entries, -1
        at the padding."""
        index = np.full(self.size, -1)
        index[self.positions()] = np.arange(self.true_size)
        return index

    def mask(self):
        """(size,) bool: True at the real entries."""
        return self.real_index() >= 0

    def runs(self, start, stop):
        """The real entries in padded [start, stop) as contiguous runs
        (offset from start, length, index among the real entries)."""
        runs = []
        for g in range(self.groups):
            lo = max(start, g * self.padded_group_size)
            hi = min(stop, g * self.padded_group_size + self.group_size)
            if hi > lo:
                runs.append((lo - start, hi - lo, g * self.group_size + lo - g * self.padded_group_size))
        return runs


def full_padding(padding, shape):
    """One `AxisPadding` per dim of `shape`, None entries (or no `padding`) unpadded."""
    return tuple(AxisPadding.trailing(n, n) if p is None else p for p, n in zip(padding or (None,) * len(shape), shape))


def paddings(variable):
    """One `AxisPadding` per dim of a variable (see `add_sharded_weight`)."""
    return getattr(variable, "_tp_zoo_padding", None) or tuple(
        AxisPadding.trailing(n, n) for n in variable.shape
    )


def inputs_last(variable):
    """How many trailing dims of `variable` are the leading (input) dims of
    the weight it stands for: int8 values are stored output-major
    (quantize/int8.py), and get/set_weights and export show them in the kernel's
    order. 0 for a variable stored in its weight's order."""
    return getattr(variable, "_tp_zoo_inputs_last", 0)


def layout_of(variable):
    """The layout a sharded variable was made with (see `add_sharded_weight`)."""
    return variable._tp_zoo_layout


def true_shape(variable):
    """The shape a variable stands for: its own, less its tp padding."""
    return tuple(p.true_size for p in paddings(variable))


def real_part(value, axis_paddings):
    """The real entries of a padded array."""
    value = np.asarray(value)
    for axis, padding in enumerate(axis_paddings):
        if padding.is_padded:
            value = np.take(value, padding.positions(), axis=axis)
    return value


def scatter_real(value, axis_paddings, fill=0):
    """A true-shape array placed at its real entries of the padded shape,
    `fill` elsewhere."""
    value = np.asarray(value)
    if not any(p.is_padded for p in axis_paddings):
        return value
    out = np.full([p.size for p in axis_paddings], fill, value.dtype)
    out[np.ix_(*(p.positions() for p in axis_paddings))] = value
    return out


def true_value(variable):
    """The variable's value as a numpy array, padding cut off."""
    return real_part(variable.numpy(), paddings(variable))


def _padded(path, value, axis_paddings):
    value = np.asarray(value)
    wanted = tuple(p.true_size for p in axis_paddings)
    if value.shape != wanted:
        raise ValueError(f"{path} takes a value of shape {wanted}; got one of shape {value.shape}.")
    return scatter_real(value, axis_paddings)


def padded_value(variable, value):
    """`value` (of the variable's true shape) with zeros at the padding."""
    return _padded(variable.path, value, paddings(variable))


def fused(variable):
    """The `Fused` parts of a variable, or None for a plain one."""
    return getattr(variable, "_tp_zoo_fused", None)


def part_path(path, part):
    """The path a part's variable would have had: the fused layer's name in
    `path` replaced by the part's layer (…/attention/qkv/kernel -> …/attention/query/kernel)."""
    *parents, _, variable_name = path.split("/")
    return "/".join(parents + [part.layer, variable_name])


def weight_views(variable, value=None):
    """(path, true-shape numpy value) of each weight a variable stands for:
    itself, or each part of a fused variable at the path and shape a
    separate layer's variable would have, in the weight's order (see
    `inputs_last`). `value` (padded, in the variable's order) defaults to
    the variable's own."""
    value = variable.numpy() if value is None else np.asarray(value)
    parts = fused(variable)
    if parts is None:
        views = [(variable.path, real_part(value, paddings(variable)))]
    else:
        views = [(part_path(variable.path, p), real_part(block, p.padding)) for p, block in parts.blocks(value)]
    return [(path, to_kernel_order(view, inputs_last(variable))) for path, view in views]


def _views_count(variable):
    parts = fused(variable)
    return 1 if parts is None else len(parts.parts)


def get_weights(variables):
    """Keras' get_weights, with every variable at its true shape (so the same
    at every tp), and a fused variable as its parts (as separate layers'
    variables would be)."""
    return [value for v in variables for _, value in weight_views(v)]


def _stored(path, value, axis_paddings, n_in):
    """A weight's true-shape value, in the weight's order, as the variable
    (or part) of `axis_paddings` stores it: padded, its first `n_in` dims
    moved last (see `inputs_last`)."""
    return to_output_major(_padded(path, value, kernel_order(axis_paddings, n_in)), n_in)


def set_weights(variables, values):
    """Keras' set_weights from true-shape values (fused variables' parts one
    by one, each in its weight's order, as get_weights gives them); a wrong
    count or shape names the variable and both shapes."""
    values = list(values)
    expected = sum(_views_count(v) for v in variables)
    if len(values) != expected:
        raise ValueError(f"Expected {expected} weight arrays, got {len(values)}.")
    padded, start = [], 0
    for v in variables:  # check all before assigning any
        parts = fused(v)
        if parts is None:
            padded.append(_stored(v.path, values[start], paddings(v), inputs_last(v)))
        else:
            blocks = [
                _stored(part_path(v.path, p), w, p.padding, inputs_last(v))
                for p, w in zip(parts.parts, values[start : start + len(parts.parts)])
            ]
            padded.append(parts.join(blocks, tuple(v.shape)))
        start += _views_count(v)
    for variable, value in zip(variables, padded):
        variable.assign(value)


def assign_true_values(variables, values):
    """Each variable from its own true-shape value (a fused variable whole,
    as saved files hold it); all checked before any is assigned."""
    values = list(values)
    if len(values) != len(variables):
        raise ValueError(f"Expected {len(variables)} variables' values, got {len(values)}.")
    padded = [padded_value(v, w) for v, w in zip(variables, values)]
    for variable, value in zip(variables, padded):
        variable.assign(value)


def real_mask(axis_paddings):
    """A bool array broadcastable to the padded shape: True at the real
    entries (`axis_paddings`: an `AxisPadding` or None per dim)."""
    mask = np.ones((1,) * len(axis_paddings), bool)
    for axis, padding in enumerate(axis_paddings):
        if padding is not None and padding.is_padded:
            mask = mask & padding.mask().reshape((-1,) + (1,) * (len(axis_paddings) - axis - 1))
    return jnp.asarray(mask)


class TrueShapeWeights:
    """get_weights/set_weights of a layer or model at its variables' true
    shapes: the same arrays at every tp."""

    def get_weights(self):
        return get_weights(self.weights)

    def set_weights(self, weights):
        set_weights(self.weights, weights)


class ShardedLayer(TrueShapeWeights, keras.layers.Layer):
    """A Keras layer that shards its variables over the active mesh.

    The mesh is that of the Keras distribution active when the layer is
    made; with none (or tp == 1) the layer computes on whole arrays, exactly
    as its single-device twin does.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.mesh_info = parallel.active_mesh()

    @property
    def tp(self):
        return 1 if self.mesh_info is None else self.mesh_info.tp

    def add_sharded_weight(
        self, name, shape, layout, initializer, trainable=True, dtype=None, padding=None, parts=None, inputs_last=0,
        from_kernel=None,
    ):
        """A variable of global `shape`, its dims split as `layout` says.

        `layout` has one entry per dim: `parallel.MODEL` (split over the
        tensor-parallel devices) or None (whole on every device); it is
        declared here once, and `layout_of(variable)` gives it to whatever runs
        the variable sharded (with the dim the data-parallel devices split
        too when the mesh is fully sharded: `parallel.storage_layout`). Where `shape` pads dims up to a multiple of
        tp, `padding` (one `AxisPadding` or None per dim) says where the
        real entries sit (at the end of a vocab, inside each kv group of
        heads). The checkpoint source, get_weights/set_weights, saving and
        export see only the real entries; a trainable variable's padding
        starts at zero whatever its initializer (quantized kernels come
        whole, their padding made). `dtype` overrides the layer's variable
        dtype (quantized kernels). `parts` (a `Fused`) makes a fused
        variable: the checkpoint source reads each part as a separate
        layer's variable (its path, shape and padding) into its place, and
        get/set_weights and export show the parts. `inputs_last`: how many
        trailing dims are the leading dims of the weight the variable stands
        for (output-major int8 values), for get/set_weights and export to
        show it in the weight's order. `from_kernel`: see `weights_from`.
        """
        shape = tuple(int(s) for s in shape)
        padding = full_padding(padding, shape)
        if tuple(p.size for p in padding) != shape:
            raise ValueError(f"{self.name}/{name}: padding {padding} does not fit shape {shape}.")
        dtype = dtype or self.variable_dtype
        layout = parallel.storage_layout(self.mesh_info, layout, shape)
        keras_layout = sharding = None
        if self.mesh_info is not None:
            keras_layout = parallel.variable_layout(self.mesh_info, layout)
            sharding = parallel.sharding(self.mesh_info, layout)
        with keras.name_scope(self.name, caller=self):
            value = None
            source = _weight_source.get()
            if source is not None:
                value = source(f"{current_path()}/{name}", shape, padding, dtype, sharding, parts, from_kernel)
            variable = keras.Variable(
                initializer=keras.initializers.get(initializer) if value is None else value,
                shape=shape, dtype=dtype, trainable=trainable, name=name, layout=keras_layout,
            )
        variable._tp_zoo_padding = padding
        variable._tp_zoo_layout = tuple(layout)
        if parts is not None:
            variable._tp_zoo_fused = parts
        if inputs_last:
            variable._tp_zoo_inputs_last = inputs_last
        if value is None and trainable and any(p.is_padded for p in padding):
            variable.assign(variable.value * real_mask(padding).astype(variable.dtype))
        return variable

    # --- saving at true shapes, whatever the tp -------------------------------
    def _own_variables(self):
        return self._trainable_variables + self._non_trainable_variables

    def save_own_variables(self, store):
        for i, variable in enumerate(self._own_variables()):
            store[str(i)] = true_value(variable)

    def load_own_variables(self, store):
        own = self._own_variables()
        # Files saved by tp_zoo before 2026-12-03 also hold a flag saying their
        # int8 values are output-major (as all are now): it is not a variable.
        saved = len([key for key in store.keys() if key != "int8_values_output_major"])
        if saved != len(own):
            raise ValueError(f"{self.name}: the saved file has {saved} variables, the layer {len(own)}.")
        assign_true_values(own, [store[str(i)] for i in range(len(own))])

    def run_sharded(self, fn, in_layouts, out_layouts, *args, key=None):
        """`parallel.run_sharded` over this layer's mesh; eager calls reuse one
        compiled program per `key` (default: `fn`, fine for bound methods)."""
        if not hasattr(self, "_sharded_programs"):
            self._sharded_programs = {}
        return parallel.run_sharded(
            self.mesh_info, fn, in_layouts, out_layouts, *args,
            compiled=self._sharded_programs, key=(fn if key is None else key, repr(in_layouts)),
        )

    def run_with_weights(self, fn, weights, in_layouts, out_layouts, *args, key=None):
        """`fn(local weights, *local args)` on every device (`run_sharded`):
        `weights` a pytree of variables (`LocalWeights`, tuples of them) that
        enter as each device's shards, by the layouts they were made with.
        The one place where weights enter a sharded computation."""
        values = jax.tree.map(lambda v: v.value, weights)
        layouts = jax.tree.map(layout_of, weights)
        return self.run_sharded(fn, (layouts,) + tuple(in_layouts), out_layouts, values, *args, key=key)
