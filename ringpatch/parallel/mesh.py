"""The process groups of a ParallelDims grid, built on torch's DeviceMesh."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from ringpatch.attention.ulysses import UlyssesRing
from ringpatch.errors import BadValue
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
    """The ranks that split one sample's sequence (all sp of them): collectives over the sequence."""
    tp_group: object
    """The ranks that split one layer's heads and MLP."""
    grad_group: object
    """dp x sp: ZeRO shards and gradient averaging."""
    seq_group: object = None
    """What patch_model and shard_batch take: sp_group, or with ulysses > 1 a UlyssesRing whose
    Ulysses groups are neighbouring ranks and whose rings run across them."""


def build_mesh(dims: ParallelDims, device_type: str = "cpu") -> Mesh:
    """Create every group of the grid; all ranks must call this together."""
    from torch.distributed.device_mesh import init_device_mesh

    if dist.get_world_size() != dims.world:
        raise BadValue(f"the recipe plans {dims.world} ranks but {dist.get_world_size()} were launched")
    shape = (dims.dp, dims.ring, dims.ulysses, dims.tp)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=("dp", "ring", "ulysses", "tp"))
    sp = mesh["ring", "ulysses"]._flatten("sp")
    grad = mesh["dp", "ring", "ulysses"]._flatten("dp_sp")
    dp_rank, sp_rank, tp_rank = dims.coords(dist.get_rank())
    sp_group = sp.get_group()
    seq_group = sp_group
    if dims.ulysses > 1:
        seq_group = UlyssesRing(sp_group, mesh.get_group("ulysses"), mesh.get_group("ring"), dims.ulysses, dims.ring)
    return Mesh(dims, mesh, dp_rank, sp_rank, tp_rank, sp_group, mesh.get_group("tp"), grad.get_group(), seq_group)
