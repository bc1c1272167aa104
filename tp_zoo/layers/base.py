"""What every sharded layer shares: finding the mesh and making its variables."""

import contextlib
import contextvars

import keras
import numpy as np
from keras.src.backend.common.name_scope import current_path

from tp_zoo import parallel
from tp_zoo.errors import ShardingError

_weight_source = contextvars.ContextVar("tp_zoo_weight_source", default=None)


@contextlib.contextmanager
def weights_from(source):
    """Variables made in this scope take their values from `source`.

    `source(path, shape, true_shape, dtype, sharding)` returns the variable's
    value as a global array of `shape` already placed on the devices
    (`sharding` is None when no mesh is active; `true_shape` is the part of
    `shape` that is not tp padding), or None to fall back to the layer's
    initializer. This
    is how checkpoints stream into shards: no variable is first filled at
    random and then overwritten.
    """
    token = _weight_source.set(source)
    try:
        yield
    finally:
        _weight_source.reset(token)


def valid_tp_values(*sizes):
    """tp values up to 64 that divide every size (for error messages)."""
    return [t for t in range(1, 65) if all(s % t == 0 for s in sizes)]


def check_divisible(layer_name, what, size, tp):
    if size % tp:
        raise ShardingError(
            f"{layer_name}: {what} = {size} is not divisible by tp={tp}. "
            f"tp values that would work: {valid_tp_values(size)}."
        )


def true_shape(variable):
    """The shape a variable stands for: its own, less any padding up to a
    multiple of tp (see `ShardedLayer.add_sharded_weight`)."""
    return getattr(variable, "_tp_zoo_true_shape", tuple(variable.shape))


def true_value(variable):
    """The variable's value as a numpy array, padding cut off."""
    return np.asarray(variable.numpy())[tuple(slice(0, n) for n in true_shape(variable))]


def padded_value(variable, value):
    """`value` (of the variable's true shape) padded with zeros to its shape."""
    value = np.asarray(value)
    wanted = true_shape(variable)
    if value.shape != wanted:
        raise ValueError(f"{variable.path} takes a value of shape {wanted}; got one of shape {value.shape}.")
    padding = [(0, n - t) for n, t in zip(variable.shape, wanted)]
    return np.pad(value, padding) if any(p for _, p in padding) else value


def get_weights(variables):
    """Keras' get_weights, with every variable at its true shape (so the same
    at every tp)."""
    return [true_value(v) for v in variables]


def set_weights(variables, values):
    """Keras' set_weights from true-shape values; a wrong count or shape names
    the variable and both shapes."""
    values = list(values)
    if len(values) != len(variables):
        raise ValueError(f"Expected {len(variables)} weight arrays, got {len(values)}.")
    padded = [padded_value(v, w) for v, w in zip(variables, values)]  # check all before assigning any
    for variable, value in zip(variables, padded):
        variable.assign(value)


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

    def add_sharded_weight(self, name, shape, layout, initializer, trainable=True, true_shape=None, dtype=None):
        """A variable of global `shape`, its dims split as `layout` says.

        `layout` has one entry per dim: `parallel.MODEL` (split over the
        tensor-parallel devices) or None (whole on every device). Where
        `shape` pads a dim up to a multiple of tp (a vocab that tp does not
        divide), `true_shape` is the shape the variable stands for: the
        checkpoint source, get_weights/set_weights, saving and export see
        only that part. `dtype` overrides the layer's variable dtype (int8
        kernels and their scales).
        """
        shape = tuple(int(s) for s in shape)
        true_shape = shape if true_shape is None else tuple(int(s) for s in true_shape)
        dtype = dtype or self.variable_dtype
        keras_layout = sharding = None
        if self.mesh_info is not None:
            keras_layout = parallel.variable_layout(self.mesh_info, layout)
            sharding = parallel.sharding(self.mesh_info, layout)
        with keras.name_scope(self.name, caller=self):
            value = None
            source = _weight_source.get()
            if source is not None:
                value = source(f"{current_path()}/{name}", shape, true_shape, dtype, sharding)
            variable = keras.Variable(
                initializer=keras.initializers.get(initializer)
                if value is None
                else value,
                shape=shape,
                dtype=dtype,
                trainable=trainable,
                name=name,
                layout=keras_layout,
            )
        variable._tp_zoo_true_shape = true_shape
        return variable

    # --- saving at true shapes, whatever the tp -------------------------------
    def _own_variables(self):
        return self._trainable_variables + self._non_trainable_variables

    def save_own_variables(self, store):
        for i, variable in enumerate(self._own_variables()):
            store[str(i)] = true_value(variable)

    def load_own_variables(self, store):
        own = self._own_variables()
        if len(store.keys()) != len(own):
            raise ValueError(f"{self.name}: the saved file has {len(store.keys())} variables, the layer {len(own)}.")
        set_weights(own, [store[str(i)] for i in range(len(own))])

    def run_sharded(self, fn, in_layouts, out_layouts, *args, key=None):
        """`parallel.run_sharded` over this layer's mesh; eager calls reuse one
        compiled program per `key` (default: `fn`, fine for bound methods)."""
        if not hasattr(self, "_sharded_programs"):
            self._sharded_programs = {}
        return parallel.run_sharded(
            self.mesh_info, fn, in_layouts, out_layouts, *args,
            compiled=self._sharded_programs, key=(fn if key is None else key, repr(in_layouts)),
        )
