"""The dp x sp x tp grid and process start.

  dims.py     ParallelDims: the split of the world and every fact derived from it
  mesh.py     the grid's process groups (DeviceMesh)
  process.py  joining and leaving the launcher's process group, one way for every command

Imports ringpatch.attention only (for the layout's chunk count).
"""

from ringpatch.parallel.dims import ParallelDims
from ringpatch.parallel.mesh import Mesh, build_mesh
from ringpatch.parallel.process import (
    allocator_settings,
    is_timeout,
    launch_int,
    leave,
    local_device,
    nccl_settings,
    set_timeouts,
    single_process_env,
    start,
    stop,
)

__all__ = [
    "launch_int",
    "ParallelDims",
    "Mesh",
    "build_mesh",
    "start",
    "stop",
    "local_device",
    "single_process_env",
    "set_timeouts",
    "is_timeout",
    "allocator_settings",
    "nccl_settings",
    "leave",
]
