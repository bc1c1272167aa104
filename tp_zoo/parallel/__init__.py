"""Mesh and collectives: the only code that knows about shard_map and axis names."""

from tp_zoo.parallel.collectives import BATCH
from tp_zoo.parallel.collectives import FSDP
from tp_zoo.parallel.collectives import MODEL
from tp_zoo.parallel.collectives import all_gather
from tp_zoo.parallel.collectives import all_reduce
from tp_zoo.parallel.collectives import all_reduce_max
from tp_zoo.parallel.collectives import kernel_result
from tp_zoo.parallel.collectives import model_index
from tp_zoo.parallel.collectives import run_sharded
from tp_zoo.parallel.collectives import sharding
from tp_zoo.parallel.collectives import storage_layout
from tp_zoo.parallel.collectives import variable_layout
from tp_zoo.parallel.mesh import MeshInfo
from tp_zoo.parallel.mesh import active_mesh
from tp_zoo.parallel.mesh import distribution
from tp_zoo.parallel.mesh import on_gpu
from tp_zoo.parallel.mesh import place_on_mesh
from tp_zoo.parallel.processes import global_replicated
from tp_zoo.parallel.processes import initialize
