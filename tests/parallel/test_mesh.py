"""The dp x sp x tp grid: tp innermost, groups with the expected members, clear errors."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from ringpatch.parallel import ParallelDims, build_mesh
from tests.helpers.procs import spawn

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "world, sp, tp, match",
    [
        (6, 4, 1, r"world size 6 is not divisible by sp\*tp = 4\*1 = 4"),
        (8, 3, 2, r"world size 8 is not divisible by sp\*tp = 3\*2 = 6"),
        (4, 0, 1, r"sp must be a positive int, got 0"),
        (4, 2, True, r"tp must be a positive int, got True"),
    ],
)
def test_bad_dims(world, sp, tp, match):
    with pytest.raises(ValueError, match=match):
        ParallelDims(world, sp, tp)


def test_heads_must_divide_by_tp():
    dims = ParallelDims(8, sp=2, tp=4)
    dims.check_heads(32, 8)
    with pytest.raises(ValueError, match=r"key/value heads 2 are not divisible by tp=4; choose tp among \[1, 2\]"):
        dims.check_heads(32, 2)


def test_coords_put_tp_innermost():
    dims = ParallelDims(8, sp=2, tp=2)
    assert dims.dp == 2
    assert [dims.coords(r) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1),
    ]  # fmt: skip


def _check_groups(rank, world, sp, tp):
    dims = ParallelDims(world, sp, tp)
    mesh = build_mesh(dims)
    dp_rank, sp_rank, tp_rank = dims.coords(rank)
    assert (mesh.dp_rank, mesh.sp_rank, mesh.tp_rank) == (dp_rank, sp_rank, tp_rank)
    base = dp_rank * sp * tp
    assert dist.get_process_group_ranks(mesh.tp_group) == [base + sp_rank * tp + t for t in range(tp)]
    assert dist.get_process_group_ranks(mesh.sp_group) == [base + s * tp + tp_rank for s in range(sp)]
    assert dist.get_process_group_ranks(mesh.grad_group) == [r for r in range(world) if r % tp == tp_rank]
    assert dist.get_rank(mesh.sp_group) == sp_rank


@pytest.mark.multiprocess
@pytest.mark.parametrize("sp, tp", [(2, 2), (4, 1), (1, 2)])
def test_groups_on_four_ranks(sp, tp):
    spawn(_check_groups, 4, sp, tp)


def _check_world_mismatch(rank, world):
    with pytest.raises(ValueError, match=r"the recipe plans 8 ranks but 2 were launched"):
        build_mesh(ParallelDims(8, sp=2))


@pytest.mark.multiprocess
def test_world_mismatch():
    spawn(_check_world_mismatch, 2)


def _check_ring_on_sub_groups(rank, world):
    """dp=2 x sp=2: each dp index rings over its own sp group on its own sample."""
    import torch

    import ringpatch
    from tests.helpers.reference import attention, rel_err

    mesh = build_mesh(ParallelDims(world, sp=2))
    g = torch.Generator().manual_seed(100 + mesh.dp_rank)
    q, k, v = (torch.randn(1, 32, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    local = [ringpatch.shard(x.float(), group=mesh.sp_group) for x in (q, k, v)]
    out = ringpatch.ring_attention(*local, group=mesh.sp_group, window=7)
    full = ringpatch.unshard(out, group=mesh.sp_group)
    err = rel_err(full, attention(q, k, v, True, 7))
    assert err <= 1e-5, f"dp_rank {mesh.dp_rank}: relative error {err:.1e}"


@pytest.mark.multiprocess
def test_ring_on_sub_groups():
    spawn(_check_ring_on_sub_groups, 4)


def test_ulysses_must_divide_sp_and_the_heads():
    with pytest.raises(
        ValueError, match=r"ulysses=3 does not divide the 4 sequence-parallel ranks; choose ulysses among \[1, 2, 4\]"
    ):
        ParallelDims(8, sp=4, tp=2, ulysses=3)
    dims = ParallelDims(16, sp=8, tp=2, ulysses=4)
    assert (dims.ring, dims.dp, dims.seq_len_divisor) == (2, 1, 16)
    dims.check_heads(32, 8)  # 16 query heads and 4 K/V heads per tp rank: both split 4 ways
    dims.check_heads(32, 4)  # 2 K/V heads per tp rank: each repeated twice
    with pytest.raises(ValueError, match=r"ulysses=4 does not divide the 6 query heads \(per tensor-parallel rank\)"):
        dims.check_heads(12, 4)
    with pytest.raises(
        ValueError, match=r"ulysses=4 neither divides the 3 key/value heads .* choose ulysses among \[1\]$"
    ):
        ParallelDims(8, sp=4, tp=1, ulysses=4).check_heads(12, 3)  # offered: what also divides sp
    with pytest.raises(ValueError, match=r"among \[1, 3, 6, 12\]$"):
        ParallelDims(12, sp=12, tp=1, ulysses=4).check_heads(12, 3)


def test_a_ulysses_group_must_sit_in_one_node():
    ParallelDims(16, sp=8, tp=2, ulysses=4).check_node(8)
    with pytest.raises(
        ValueError,
        match=r"ulysses=4 x tp=2 = 8 neighbouring ranks do not fit evenly in a node of 4 ranks.*among \[1, 2\]",
    ):
        ParallelDims(16, sp=8, tp=2, ulysses=4).check_node(4)


def _check_ulysses_groups(rank, world, sp, tp, ulysses):
    dims = ParallelDims(world, sp, tp, ulysses=ulysses)
    mesh = build_mesh(dims)
    dp_rank, sp_rank, tp_rank = dims.coords(rank)
    ring_rank, u = divmod(sp_rank, ulysses)
    base = dp_rank * sp * tp
    seq = mesh.seq_group
    assert (seq.ulysses, seq.ring) == (ulysses, sp // ulysses)
    assert dist.get_process_group_ranks(seq.group) == [base + s * tp + tp_rank for s in range(sp)]
    assert dist.get_rank(seq.group) == sp_rank
    first = base + ring_rank * ulysses * tp + tp_rank
    assert dist.get_process_group_ranks(seq.ulysses_group) == [first + j * tp for j in range(ulysses)]
    assert dist.get_rank(seq.ulysses_group) == u
    assert dist.get_process_group_ranks(seq.ring_group) == [
        base + (r * ulysses + u) * tp + tp_rank for r in range(sp // ulysses)
    ]
    assert dist.get_rank(seq.ring_group) == ring_rank
    assert dist.get_process_group_ranks(mesh.grad_group) == [r for r in range(world) if r % tp == tp_rank]


@pytest.mark.multiprocess
@pytest.mark.parametrize("world, sp, tp, ulysses", [(4, 4, 1, 2), (8, 4, 2, 2)])
def test_ulysses_groups_are_neighbours_and_rings_run_across(world, sp, tp, ulysses):
    spawn(_check_ulysses_groups, world, sp, tp, ulysses)
