"""Which global token positions each sequence-parallel rank holds.

contiguous: P equal chunks, rank r holds chunk r.
zigzag:     2P equal chunks, rank r holds chunks r and 2P-1-r, so under a causal
            mask every rank does the same work at every ring step (the load
            balancing used by ring-flash-attention's zigzag variant; the count is in
            docs/design.md, "Layouts").
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.distributed as dist

from ringpatch.attention.comm import resolve_group

Layout = Literal["contiguous", "zigzag"]
LAYOUTS: tuple[str, ...] = get_args(Layout)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def num_chunks(layout: Layout, sp_size: int) -> int:
    """How many equal chunks the full sequence is cut into."""
    check_layout(layout)
    return 2 * sp_size if layout == "zigzag" else sp_size


def chunk_ids(layout: Layout, sp_size: int, sp_rank: int) -> tuple[int, ...]:
    """The chunks rank `sp_rank` holds, in local storage order (increasing positions)."""
    check_layout(layout)
    if layout == "zigzag":
        return (sp_rank, 2 * sp_size - 1 - sp_rank)
    return (sp_rank,)


def check_seq_len(seq_len: int, layout: Layout, sp_size: int) -> None:
    chunks = num_chunks(layout, sp_size)
    if seq_len % chunks:
        padded = -(-seq_len // chunks) * chunks
        factor = "2*sp_size" if layout == "zigzag" else "sp_size"
        raise ValueError(
            f"seq_len {seq_len} is not divisible by {factor}={chunks} ({layout}); "
            f"pad to {padded} or use ringpatch.shard_batch, which pads for you"
        )


def local_ranges(layout: Layout, seq_len: int, sp_size: int, sp_rank: int) -> tuple[tuple[int, int], ...]:
    """(global start, length) of each chunk rank `sp_rank` holds, in local order."""
    check_seq_len(seq_len, layout, sp_size)
    c = seq_len // num_chunks(layout, sp_size)
    return tuple((i * c, c) for i in chunk_ids(layout, sp_size, sp_rank))


def local_positions(layout: Layout, seq_len: int, sp_size: int, sp_rank: int, device=None) -> torch.Tensor:
    """Global positions of the tokens rank `sp_rank` holds, in local order. # (S_local,)"""
    parts = [torch.arange(s, s + n, device=device) for s, n in local_ranges(layout, seq_len, sp_size, sp_rank)]
    return torch.cat(parts)


def shard(x: torch.Tensor, group=None, dim: int = 1, layout: Layout = "zigzag") -> torch.Tensor:
    """Cut the full tensor `x` along `dim` and return this rank's part (a copy)."""
    check_layout(layout)
    _, sp_size, sp_rank = resolve_group(group)
    dim = dim % x.dim()
    ranges = local_ranges(layout, x.shape[dim], sp_size, sp_rank)
    return torch.cat([x.narrow(dim, s, n) for s, n in ranges], dim=dim)


def unshard(x_local: torch.Tensor, group=None, dim: int = 1, layout: Layout = "zigzag") -> torch.Tensor:
    """Gather every rank's part of `x_local` along `dim` and return the full tensor in
    original order. Every rank must hold a part of the same shape. Not differentiable:
    use it to inspect outputs (e.g. full logits for evaluation)."""
    check_layout(layout)
    group, sp_size, _ = resolve_group(group)
    if sp_size == 1:
        return x_local.clone()
    dim = dim % x_local.dim()
    parts = [torch.empty_like(x_local) for _ in range(sp_size)]
    dist.all_gather(parts, x_local.detach().contiguous(), group=group)
    seq_len = x_local.shape[dim] * sp_size
    pieces: dict[int, torch.Tensor] = {}
    for rank, part in enumerate(parts):
        offset = 0
        for start, n in local_ranges(layout, seq_len, sp_size, rank):
            pieces[start] = part.narrow(dim, offset, n)
            offset += n
    return torch.cat([pieces[s] for s in sorted(pieces)], dim=dim)
