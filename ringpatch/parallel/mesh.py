"""The process groups of a ParallelDims grid, built on torch's DeviceMesh."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from ringpatch.parallel.dims import ParallelDims


@dataclass(frozen=True)
class Mesh:
    """This rank's coordinates and groups in the grid."""

    dims: ParallelDims
    device_mesh: object
    dp_rank: int
    sp_rank: int
    tp_rank: int
    sp_group: object
    """The ring: the ranks that split one sample's sequence."""
    tp_group: object
    """The ranks that split one layer's heads and MLP."""
    grad_group: object
    """dp x sp: ZeRO shards and gradient averaging."""


def build_mesh(dims: ParallelDims, device_type: str = "cpu") -> Mesh:
    """Create every group of the grid; all ranks must call this together."""
    from torch.distributed.device_mesh import init_device_mesh

    if dist.get_world_size() != dims.world:
        raise ValueError(f"the recipe plans {dims.world} ranks but {dist.get_world_size()} were launched")
    mesh = init_device_mesh(device_type, (dims.dp, dims.sp, dims.tp), mesh_dim_names=("dp", "sp", "tp"))
    grad = mesh["dp", "sp"]._flatten("dp_sp")
    dp_rank, sp_rank, tp_rank = dims.coords(dist.get_rank())
    return Mesh(dims, mesh, dp_rank, sp_rank, tp_rank, mesh.get_group("sp"), mesh.get_group("tp"), grad.get_group())
