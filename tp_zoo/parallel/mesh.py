"""The device mesh: ("batch", "model") axes of shape (dp, tp).

With `fsdp=True` the data-parallel ("batch") axis also splits the variables
(fully sharded data parallelism, ZeRO-3): each device stores 1/(dp x tp)
of every variable and of its optimizer moments, and gathers a layer's
weights over the axis just before using them (`collectives.run_sharded`).
"""

import dataclasses

import jax
import keras
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

BATCH_AXIS = "batch"
MODEL_AXIS = "model"


def on_gpu():
    """Whether JAX runs on NVIDIA GPUs (where the Pallas GPU kernels and
    cuDNN attention apply)."""
    return jax.devices()[0].platform == "gpu"


class ShardedDistribution(keras.distribution.ModelParallel):
    """Keras' `ModelParallel` over a (dp, tp) mesh that also says whether
    the variables are split over the data-parallel axis (`fully_sharded`)."""

    def __init__(self, *, fully_sharded=False, **kwargs):
        super().__init__(**kwargs)
        self.fully_sharded = fully_sharded


def distribution(tp=1, dp=1, devices=None, fsdp=1):
    """A Keras distribution over a (dp, tp) device mesh.

    Args:
        tp: tensor-parallel degree (size of the "model" axis).
        dp: data-parallel degree (size of the "batch" axis).
        devices: devices to use; the first `dp * tp` of `jax.devices()`
            when omitted.
        fsdp: fully sharded data-parallel degree, instead of `dp`: the
            batch is split over `fsdp` devices as with dp, and so are the
            variables and their optimizer moments (besides tp's split),
            each layer's weights gathered just before use.

    Use it as `with tp_zoo.distribution(tp=2).scope(): ...` or pass it to
    `keras.distribution.set_distribution`. Layers of `tp_zoo.layers` shard
    their variables over the "model" axis; Keras shards input batches over
    the "batch" axis.
    """
    for name, value in (("tp", tp), ("dp", dp), ("fsdp", fsdp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    if dp > 1 and fsdp > 1:
        raise ValueError(f"dp={dp} and fsdp={fsdp}: give one of them. fsdp devices split the batch as dp devices do "
                         "and the variables as well; replicated groups of fully sharded devices are not supported.")
    fully_sharded, dp = fsdp > 1, max(dp, fsdp)
    available = list(jax.devices()) if devices is None else list(devices)
    if tp * dp > len(available):
        hint = ""
        if all(d.platform == "cpu" for d in available):
            hint = (
                " On a CPU-only machine, simulate more devices by setting "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={tp * dp} "
                "before jax is imported."
            )
        raise ValueError(
            f"tp={tp} x {'fsdp' if fully_sharded else 'dp'}={dp} needs {tp * dp} devices, but only "
            f"{len(available)} {'is' if len(available) == 1 else 'are'} "
            f"available ({available[0].platform if available else 'none'})."
            + hint
        )
    mesh = keras.distribution.DeviceMesh(
        shape=(dp, tp),
        axis_names=(BATCH_AXIS, MODEL_AXIS),
        devices=available[: tp * dp],
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    return ShardedDistribution(layout_map=layout_map, batch_dim_name=BATCH_AXIS, fully_sharded=fully_sharded)


@dataclasses.dataclass(frozen=True)
class MeshInfo:
    """The active mesh as the sharded layers see it."""

    keras_mesh: keras.distribution.DeviceMesh
    mesh: jax.sharding.Mesh
    tp: int
    dp: int
    fully_sharded: bool = False  # variables split over the dp devices too

    @property
    def runs_sharded(self):
        """Whether layers run per device (shard_map): with tp > 1, or with
        variables split over the dp devices (gathered inside)."""
        return self.tp > 1 or self.fully_sharded


def active_mesh():
    """The mesh of the active Keras distribution, or None.

    None means "compute as on one device": no distribution is active, or
    the active one has no "model" axis.
    """
    dist = keras.distribution.distribution()
    if dist is None:
        return None
    keras_mesh = dist.device_mesh
    names = tuple(keras_mesh.axis_names)
    if MODEL_AXIS not in names:
        return None
    shape = dict(zip(names, keras_mesh.shape))
    return MeshInfo(
        keras_mesh=keras_mesh,
        mesh=keras_mesh.backend_mesh,
        tp=shape[MODEL_AXIS],
        dp=shape.get(BATCH_AXIS, 1),
        fully_sharded=getattr(dist, "fully_sharded", False),
    )


def place_on_mesh(distribution, variables):
    """Puts on the mesh of `distribution` (a Keras distribution, or None)
    the values of `variables` that Keras left on its one device.

    On a mesh of one device, JAX deems an array committed to that device
    placed as the mesh's sharding, so Keras keeps the values it makes or is
    given (initializers under 250 MB, LoRA adapters, optimizer slots, metric
    totals, assigned arrays) as they are, beside values placed on the mesh
    (checkpoint loads, larger variables); its trainer then warns of "a mix of
    local and distributed variables" that cannot fail. On a mesh of several
    devices Keras places every value itself.
    """
    if distribution is None or distribution.device_mesh.backend_mesh.size != 1:
        return
    placed = NamedSharding(distribution.device_mesh.backend_mesh, PartitionSpec())
    for variable in variables:
        if isinstance(variable.value.sharding, jax.sharding.SingleDeviceSharding):
            variable.assign(jax.device_put(variable.value, placed))
