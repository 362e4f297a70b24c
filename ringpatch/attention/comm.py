"""Asynchronous neighbour exchange on pre-allocated buffers.

Both directions of one exchange are issued together through batch_isend_irecv, so NCCL
pairs them without deadlock even when P = 2 (send and receive with the same peer).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ringpatch.attention.ulysses import UlyssesRing
from ringpatch.errors import BadValue


class Exchange:
    """Send `send` to group rank `dst` while receiving into `recv` from group rank `src`."""

    def __init__(self, send: torch.Tensor, recv: torch.Tensor, dst: int, src: int, group, tag: int):
        ops = [
            dist.P2POp(dist.isend, send, dist.get_global_rank(group, dst), group, tag),
            dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, src), group, tag),
        ]
        self._reqs = dist.batch_isend_irecv(ops)
        self._buffers = (send, recv)  # keep both alive until wait(): the transfer uses them

    def wait(self) -> None:
        for req in self._reqs:
            req.wait()
        self._buffers = None


def resolve_group(group):
    """The process group to use for collectives over the sequence, its size and this process'
    rank in it (size 1 without dist). A UlyssesRing resolves to its group of all N ranks."""
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise BadValue("a process group was given but torch.distributed is not initialised")
        return None, 1, 0
    if isinstance(group, UlyssesRing):
        group = group.group
    group = group if group is not None else dist.group.WORLD
    return group, dist.get_world_size(group), dist.get_rank(group)


def group_device(group, fallback: torch.device) -> torch.device:
    """Where a collective over `group` takes its tensors: the current CUDA device for NCCL,
    `fallback` (the data's device) otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


def agree(
    error: Exception | None, row: list, group, sp_size: int, device: torch.device, what: str = "the inputs"
) -> list[tuple[int, ...]]:
    """Every rank learns whether every rank's local checks passed, and every rank's `row` of ints
    (one all_gather and one host sync). Entries of `row` may be 0-d integer tensors, such as a
    check's result on the device, so a check and the agreement cost that one sync together.

    A rank whose checks failed raises its own `error`; the others raise a ValueError naming the
    failed ranks (`what` names the inputs); no rank is left waiting in a collective that the others never enter. Returns
    every rank's row (this rank's alone when sp_size is 1)."""
    if sp_size == 1:
        if error is not None:
            raise error
        return [tuple(int(x) for x in row)]
    device = group_device(group, device)
    if error is None:
        mine = torch.stack([torch.as_tensor(x, dtype=torch.int64).to(device) for x in (1, *row)])
    else:
        mine = torch.zeros(1 + len(row), dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(sp_size)]
    dist.all_gather(every, mine, group=group)
    rows = [tuple(r) for r in torch.stack(every).tolist()]
    if error is not None:
        raise error
    failed = [r for r, found in enumerate(rows) if found[0] == 0]
    if failed:
        raise BadValue(f"{what} were rejected on rank(s) {failed} of the group; see their error")
    return [found[1:] for found in rows]


class SumOverGroup(torch.autograd.Function):
    """all_reduce(SUM) with its exact gradient: the sum of every rank's upstream gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        group = resolve_group(group)[0]
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None
