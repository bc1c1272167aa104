"""Several processes (one per host) as one JAX program."""

import jax


def initialize(coordinator_address=None, num_processes=None, process_id=None, heartbeat_timeout_seconds=60,
               **kwargs):
    """Starts JAX's multi-process runtime; call it first, in every process.

    With no arguments JAX detects the cluster where it can (Slurm, Open MPI,
    Kubernetes JobSets, TPU pods); otherwise give the coordinator's
    "host:port", the process count and this process's id. A process that
    stops answering makes the others fail after `heartbeat_timeout_seconds`
    instead of waiting for it forever.
    """
    # Collectives between CPU devices of different processes (GPUs use NCCL).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        **kwargs,
    )
    # One Keras seed for every process, so that anything drawn at random
    # (initializers, sampler seeds) is the same everywhere.
    from keras.src.backend.jax.distribution_lib import initialize_rng

    initialize_rng()


def global_replicated(mesh_info, array):
    """The same host array on every process, as one replicated global array."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec

    return jax.make_array_from_process_local_data(NamedSharding(mesh_info.mesh, PartitionSpec()), array)
