"""The dp x sp x tp process grid (DESIGN.md, "Process groups").

world = dp * sp * tp, tp innermost (neighbouring ranks, same node), sp next, dp outermost:
rank = (dp_rank * sp + sp_rank) * tp + tp_rank. Every rank of one dp index sees the same
sample; ZeRO sharding and gradient averaging span dp x sp (all ranks with one tp index).
Built on torch's DeviceMesh, validated first with the numbers in every message.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDims:
    """How `world` ranks split into data, sequence and tensor parallelism."""

    world: int
    sp: int = 1  # sequence-parallel (ring) ranks per sample
    tp: int = 1  # tensor-parallel ranks per layer shard

    def __post_init__(self):
        for name in ("world", "sp", "tp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.world % (self.sp * self.tp):
            raise ValueError(
                f"world size {self.world} is not divisible by sp*tp = {self.sp}*{self.tp} = {self.sp * self.tp}; "
                f"dp = world / (sp*tp) must be whole: change sp or tp, or launch a multiple of {self.sp * self.tp} ranks"
            )

    @property
    def dp(self) -> int:
        return self.world // (self.sp * self.tp)

    def check_heads(self, heads: int, kv_heads: int) -> None:
        """Tensor parallelism splits attention heads: both head counts must divide by tp."""
        for name, count in (("attention heads", heads), ("key/value heads", kv_heads)):
            if count % self.tp:
                raise ValueError(
                    f"{name} {count} are not divisible by tp={self.tp}; choose tp among "
                    f"{[d for d in range(1, count + 1) if heads % d == 0 and kv_heads % d == 0]}"
                )

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp_rank, sp_rank, tp_rank) of a global rank."""
        return rank // (self.sp * self.tp), (rank // self.tp) % self.sp, rank % self.tp


@dataclass(frozen=True)
class Mesh:
    dims: ParallelDims
    device_mesh: object
    dp_rank: int
    sp_rank: int
    tp_rank: int
    sp_group: object  # the ring
    tp_group: object
    grad_group: object  # dp x sp: ZeRO shards and gradient averaging


def build_mesh(dims: ParallelDims, device_type: str = "cpu") -> Mesh:
    """Create every group of the grid; all ranks must call this together."""
    from torch.distributed.device_mesh import init_device_mesh

    if dist.get_world_size() != dims.world:
        raise ValueError(f"the recipe plans {dims.world} ranks but {dist.get_world_size()} were launched")
    mesh = init_device_mesh(device_type, (dims.dp, dims.sp, dims.tp), mesh_dim_names=("dp", "sp", "tp"))
    grad = mesh["dp", "sp"]._flatten("dp_sp")
    dp_rank, sp_rank, tp_rank = dims.coords(dist.get_rank())
    return Mesh(dims, mesh, dp_rank, sp_rank, tp_rank, mesh.get_group("sp"), mesh.get_group("tp"), grad.get_group())
