"""Running a per-device function over the mesh, and the collectives it uses.

Layers write their computation once, as the code one device runs on its own
shards (`fn` below), and call the collectives of this module in it. Outside
a sharded region (no mesh, or tp == 1) every collective is the identity, so
the same function computes the single-device result.

Backward communication is not written by hand: inside `jax.shard_map` with
varying-axis checks on, the transpose of an implicit broadcast of a
replicated input is an all-reduce (column-parallel input gradients) and the
transpose of `psum` is the identity (row-parallel output gradients).
"""

import contextlib
import contextvars
import functools

import jax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

import keras

from tp_zoo.parallel.mesh import BATCH_AXIS
from tp_zoo.parallel.mesh import MODEL_AXIS

# Markers for the dims of a layout: split over the tensor-parallel devices,
# or split over the data-parallel replicas (when the batch divides evenly).
MODEL = MODEL_AXIS
BATCH = BATCH_AXIS

_sharded_region = contextvars.ContextVar("tp_zoo_sharded_region", default=False)


@contextlib.contextmanager
def _inside_sharded_region():
    token = _sharded_region.set(True)
    try:
        yield
    finally:
        _sharded_region.reset(token)


def _spec(layout, batch_sharded):
    return PartitionSpec(
        *(
            None if (d == BATCH and not batch_sharded) else d
            for d in layout
        )
    )


def run_sharded(mesh_info, fn, in_layouts, out_layouts, *args, compiled=None, key=None):
    """Runs `fn` on each device's shards of `args` and returns global arrays.

    `in_layouts` / `out_layouts` give, per argument / output, a tuple with
    one entry per dim: `MODEL`, `BATCH` or None (pytrees of tuples are
    fine). With no mesh or tp == 1, `fn` runs once on the whole arrays and
    the collectives are the identity.

    Called outside any trace (an eager call), the sharded program is
    compiled once and kept in the dict `compiled` under `key` (which must
    name everything the program depends on besides the shapes of `args`);
    an eager shard_map would otherwise dispatch, and compile, op by op.
    """
    if mesh_info is None or mesh_info.tp == 1:
        return fn(*args)
    batch_sharded = mesh_info.dp > 1 and _batch_divides(
        in_layouts, args, mesh_info.dp
    )
    eager = compiled is not None and not any(
        isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args)
    )
    if eager and (key, batch_sharded) in compiled:
        return compiled[key, batch_sharded](*args)
    to_specs = lambda layouts: jax.tree.map(
        lambda l: _spec(l, batch_sharded), layouts, is_leaf=_is_layout
    )

    @functools.wraps(fn)
    def body(*local_args):
        with _inside_sharded_region():
            return fn(*local_args)

    program = jax.shard_map(
        body,
        mesh=mesh_info.mesh,
        in_specs=tuple(to_specs(l) for l in in_layouts),
        out_specs=to_specs(out_layouts),
    )
    if eager:
        program = compiled[key, batch_sharded] = jax.jit(program)
    return program(*args)


def _is_layout(x):
    return isinstance(x, tuple) and all(d is None or isinstance(d, str) for d in x)


def _batch_divides(in_layouts, args, dp):
    layouts = jax.tree.leaves(tuple(in_layouts), is_leaf=_is_layout)
    for layout, array in zip(layouts, jax.tree.leaves(tuple(args))):
        if BATCH in layout:
            return jax.numpy.shape(array)[layout.index(BATCH)] % dp == 0
    return False


def variable_layout(mesh_info, layout):
    """The Keras `TensorLayout` of a variable with the given dims layout."""
    return keras.distribution.TensorLayout(
        tuple(d if d == MODEL else None for d in layout), mesh_info.keras_mesh
    )


def sharding(mesh_info, layout):
    """The `jax.sharding.NamedSharding` of a global array (variables, caches)."""
    return NamedSharding(
        mesh_info.mesh,
        PartitionSpec(*(d if d == MODEL else None for d in layout)),
    )


def in_sharded_region():
    return _sharded_region.get()


def all_reduce(x):
    """Sum over the tensor-parallel devices."""
    return lax.psum(x, MODEL) if in_sharded_region() else x


def all_reduce_max(x):
    """Max over the tensor-parallel devices (no gradient flows through it)."""
    if not in_sharded_region():
        return x
    return lax.pmax(lax.stop_gradient(x), MODEL)


def all_gather(x, axis):
    """Concatenates the devices' shards along `axis`, in device order."""
    if not in_sharded_region():
        return x
    return lax.all_gather(x, MODEL, axis=axis, tiled=True, to="invarying")


def model_index():
    """This device's position on the tensor-parallel axis (0 outside)."""
    return lax.axis_index(MODEL) if in_sharded_region() else 0


def kernel_result(shape, dtype, *inputs):
    """The shape and dtype of a custom kernel's result (a Pallas call's
    out_shape) computed from `inputs`. Inside a sharded region shard_map
    asks such a kernel to declare which mesh axes its result varies over:
    every axis that any input varies over."""
    if not in_sharded_region():
        return jax.ShapeDtypeStruct(shape, dtype)
    mat = jax.typeof(inputs[0]).mat
    varying = frozenset().union(*(jax.typeof(x).mat.varying for x in inputs))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat.update(varying=varying))
