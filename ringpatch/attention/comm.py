"""Asynchronous neighbour exchange on pre-allocated buffers.

Both directions of one exchange are issued together through batch_isend_irecv, so NCCL
pairs them without deadlock even when P = 2 (send and receive with the same peer).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ringpatch.attention.ulysses import UlyssesRing


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
            raise ValueError("a process group was given but torch.distributed is not initialised")
        return None, 1, 0
    if isinstance(group, UlyssesRing):
        group = group.group
    group = group if group is not None else dist.group.WORLD
    return group, dist.get_world_size(group), dist.get_rank(group)


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
