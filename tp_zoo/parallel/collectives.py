"""Running a per-device function over the mesh, and the collectives it uses.

Layers write their computation once, as the code one device runs on its own
shards (`fn` below), and call the collectives of this module in it. Outside
a sharded region (no mesh, or tp == 1) every collective is the identity, so
the same function computes the single-device result.

Backward communication is not written by hand: inside `jax.shard_map` with
varying-axis checks on, the transpose of an implicit broadcast of a
replicated input is an all-reduce (column-parallel input gradients) and the
transpose of `psum` is the identity (row-parallel output gradients).

Fully sharded variables (`MeshInfo.fully_sharded`) carry `FSDP` in one dim
of their layout (`storage_layout`): each device holds its 1/dp of that dim
and `run_sharded` all-gathers it over the data-parallel axis as the
sharded function starts, so a layer's whole weights exist only while it
runs (and again in the backward pass when remat recomputes it); the
gather's transpose reduce-scatters their gradients, never whole.
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
# split over the data-parallel replicas (a batch dim, when it divides
# evenly), or a variable's dim split over the data-parallel devices too.
MODEL = MODEL_AXIS
BATCH = BATCH_AXIS
FSDP = "fsdp"

# Inside a sharded region: the tensor-parallel degree (None outside).
_sharded_region = contextvars.ContextVar("tp_zoo_sharded_region", default=None)


@contextlib.contextmanager
def _inside_sharded_region(tp):
    token = _sharded_region.set(tp)
    try:
        yield
    finally:
        _sharded_region.reset(token)


def _spec(layout, batch_sharded, tp):
    return PartitionSpec(*(_mesh_axis(d, batch_sharded, tp) for d in layout))


def _mesh_axis(marker, batch_sharded, tp):
    """The mesh axis a layout's marker splits a dim over inside the region;
    None for a batch that does not divide, and for a model axis of one
    device (whose values would otherwise count as varying over it)."""
    if marker == FSDP:
        return BATCH_AXIS
    if (marker == BATCH and not batch_sharded) or (marker == MODEL and tp == 1):
        return None
    return marker


def storage_layout(mesh_info, layout, shape):
    """The layout a variable of `shape` is stored in: `layout` (its split
    over tp), with `FSDP` on its largest dim that tp does not split and
    the dp devices divide, when the variables are fully sharded. A
    variable with no such dim (a bias split over tp) stays whole over dp."""
    layout = tuple(layout)
    if mesh_info is None or not mesh_info.fully_sharded:
        return layout
    free = [d for d, (marker, size) in enumerate(zip(layout, shape)) if marker is None and size % mesh_info.dp == 0]
    if not free:
        return layout
    dim = max(free, key=lambda d: shape[d])
    return layout[:dim] + (FSDP,) + layout[dim + 1 :]


_GATHERED = "tp_zoo_fsdp_gathered"
_NOT_GATHERED = jax.checkpoint_policies.save_anything_except_these_names(_GATHERED)


def _gather_fully_sharded(layouts, args, batch_sharded):
    """Each argument whole over the data-parallel axis: the `FSDP` dim of a
    fully sharded variable's local shard all-gathered (tiled). With the
    batch split, the gathered weights meet per-device activations: left
    varying over the axis, the gather's transpose is a reduce-scatter of
    the devices' gradients. With the batch whole (a generate call of one
    row), every device computes the same: the gather is made invariant."""
    to = "varying" if batch_sharded else "invarying"

    def gather(layout, x):
        if FSDP not in layout:
            return x
        gathered = lax.all_gather(x, BATCH_AXIS, axis=layout.index(FSDP), tiled=True, to=to)
        return jax.ad_checkpoint.checkpoint_name(gathered, _GATHERED)

    return tuple(jax.tree.map(gather, l, a, is_leaf=_is_layout) for l, a in zip(layouts, args))


def run_sharded(mesh_info, fn, in_layouts, out_layouts, *args, compiled=None, key=None):
    """Runs `fn` on each device's shards of `args` and returns global arrays.

    `in_layouts` / `out_layouts` give, per argument / output, a tuple with
    one entry per dim: `MODEL`, `BATCH`, `FSDP` or None (pytrees of tuples
    are fine); an output has no `FSDP` dim. With no mesh, or tp == 1 and
    variables not fully sharded, `fn` runs once on the whole arrays and the
    collectives are the identity.

    Called outside any trace (an eager call), the sharded program is
    compiled once and kept in the dict `compiled` under `key` (which must
    name everything the program depends on besides the shapes of `args`);
    an eager shard_map would otherwise dispatch, and compile, op by op.
    """
    if mesh_info is None or not mesh_info.runs_sharded:
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
        lambda l: _spec(l, batch_sharded, mesh_info.tp), layouts, is_leaf=_is_layout
    )

    @functools.wraps(fn)
    def body(*local_args):
        with _inside_sharded_region(mesh_info.tp):
            return fn(*_gather_fully_sharded(in_layouts, local_args, batch_sharded))

    if mesh_info.fully_sharded:
        # The gathered weights are not kept for the backward pass (they are
        # what fsdp saves memory on): gathered again there; all else kept.
        body = jax.checkpoint(body, policy=_NOT_GATHERED)

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


def _stored_axis(marker):
    return BATCH_AXIS if marker == FSDP else (marker if marker == MODEL else None)


def variable_layout(mesh_info, layout):
    """The Keras `TensorLayout` of a variable with the given dims layout
    (a `storage_layout`)."""
    return keras.distribution.TensorLayout(tuple(map(_stored_axis, layout)), mesh_info.keras_mesh)


def sharding(mesh_info, layout):
    """The `jax.sharding.NamedSharding` of a global array (variables in
    their `storage_layout`, caches)."""
    return NamedSharding(mesh_info.mesh, PartitionSpec(*map(_stored_axis, layout)))


def in_sharded_region():
    return _sharded_region.get() is not None


def _split_over_model():
    """Inside a sharded region of tp > 1: at tp == 1 (a fully sharded mesh
    of one tp device) the model collectives are the identity, as outside."""
    return (_sharded_region.get() or 1) > 1


def all_reduce(x):
    """Sum over the tensor-parallel devices."""
    return lax.psum(x, MODEL) if _split_over_model() else x


def all_reduce_max(x):
    """Max over the tensor-parallel devices (no gradient flows through it)."""
    if not _split_over_model():
        return x
    return lax.pmax(lax.stop_gradient(x), MODEL)


def all_gather(x, axis):
    """Concatenates the devices' shards along `axis`, in device order."""
    if not _split_over_model():
        return x
    return lax.all_gather(x, MODEL, axis=axis, tiled=True, to="invarying")


def model_index():
    """This device's position on the tensor-parallel axis (0 outside)."""
    return lax.axis_index(MODEL) if _split_over_model() else 0


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
