"""What every sharded layer shares: finding the mesh and making its variables."""

import contextlib
import contextvars

import keras
from keras.src.backend.common.name_scope import current_path

from tp_zoo import parallel

_weight_source = contextvars.ContextVar("tp_zoo_weight_source", default=None)


@contextlib.contextmanager
def weights_from(source):
    """Variables made in this scope take their values from `source`.

    `source(path, shape, dtype, sharding)` returns the variable's value as a
    global array already placed on the devices (`sharding` is None when no
    mesh is active), or None to fall back to the layer's initializer. This
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
        raise ValueError(
            f"{layer_name}: {what} = {size} is not divisible by tp={tp}. "
            f"tp values that would work: {valid_tp_values(size)}."
        )


class ShardedLayer(keras.layers.Layer):
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

    def add_sharded_weight(self, name, shape, layout, initializer, trainable=True):
        """A variable of global `shape`, its dims split as `layout` says.

        `layout` has one entry per dim: `parallel.MODEL` (split over the
        tensor-parallel devices) or None (whole on every device).
        """
        shape = tuple(int(s) for s in shape)
        dtype = self.variable_dtype
        keras_layout = sharding = None
        if self.mesh_info is not None:
            keras_layout = parallel.variable_layout(self.mesh_info, layout)
            sharding = parallel.sharding(self.mesh_info, layout)
        with keras.name_scope(self.name, caller=self):
            value = None
            source = _weight_source.get()
            if source is not None:
                value = source(f"{current_path()}/{name}", shape, dtype, sharding)
            return keras.Variable(
                initializer=keras.initializers.get(initializer)
                if value is None
                else value,
                shape=shape,
                dtype=dtype,
                trainable=trainable,
                name=name,
                layout=keras_layout,
            )

    def run_sharded(self, fn, in_layouts, out_layouts, *args, key=None):
        """`parallel.run_sharded` over this layer's mesh; eager calls reuse one
        compiled program per `key` (default: `fn`, fine for bound methods)."""
        if not hasattr(self, "_sharded_programs"):
            self._sharded_programs = {}
        return parallel.run_sharded(
            self.mesh_info, fn, in_layouts, out_layouts, *args,
            compiled=self._sharded_programs, key=(fn if key is None else key, repr(in_layouts)),
        )
