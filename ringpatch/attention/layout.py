"""Which global token positions each sequence-parallel rank holds.

contiguous: P equal chunks, rank r holds chunk r.
zigzag:     2P equal chunks, rank r holds chunks r and 2P-1-r, so under a causal
            mask every rank does the same work at every ring step (the load
            balancing used by ring-flash-attention's zigzag variant; the count is in
            docs/design.md, "Layouts").
balanced:   8P equal chunks placed by the work each holds once packed documents are
            taken into account (balance.py); with one document per row, zigzag's placement.
            The placement then depends on each row's document boundaries (`docs`).

With Ulysses x ring (ulysses.py), the layout applies over the R = sp / U ring ranks, and each
ring rank's positions, in local order, are cut into U consecutive pieces, one per rank of its
Ulysses group.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.distributed as dist

from ringpatch.attention.balance import CHUNKS_PER_RANK, balanced_chunks
from ringpatch.attention.comm import resolve_group
from ringpatch.attention.documents import Docs, documents_per_row
from ringpatch.attention.ulysses import check_ulysses, ulysses_degree
from ringpatch.errors import BadValue

Layout = Literal["contiguous", "zigzag", "balanced"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
DEFAULT_LAYOUT: Layout = "zigzag"  # the library's: one sequence, no documents to place by
PACKED_LAYOUT: Layout = "balanced"  # the recipe's and the Trainer's: zigzag, or by the batch's packed documents


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise BadValue(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


CHUNKS_PER_RANK_OF = {"contiguous": 1, "zigzag": 2, "balanced": CHUNKS_PER_RANK}


def num_chunks(layout: Layout, sp_size: int) -> int:
    """How many equal chunks the full sequence is cut into: lengths must be a multiple of it."""
    check_layout(layout)
    return CHUNKS_PER_RANK_OF[layout] * sp_size


def check_seq_len(seq_len: int, layout: Layout, sp_size: int) -> None:
    chunks = num_chunks(layout, sp_size)
    if seq_len % chunks:
        padded = -(-seq_len // chunks) * chunks
        factor = {"contiguous": "sp_size", "zigzag": "2*sp_size", "balanced": f"{CHUNKS_PER_RANK}*sp_size"}[layout]
        raise BadValue(
            f"seq_len {seq_len} is not divisible by {factor}={chunks} ({layout}); "
            f"pad to {padded} or use ringpatch.shard_batch, which pads for you"
        )


def _merge_adjacent(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for start, n in ranges:
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((start, n))
    return tuple(merged)


def local_ranges(
    layout: Layout,
    seq_len: int,
    sp_size: int,
    sp_rank: int,
    docs: tuple[int, ...] | None = None,
    ulysses: int = 1,
) -> tuple[tuple[int, int], ...]:
    """(global start, length) of each run of positions rank `sp_rank` holds, in local order.
    `docs`: the row's document starts; only the balanced layout places tokens by them.
    `ulysses` > 1: the layout over sp_size / ulysses ring ranks, each ring rank's part cut into
    `ulysses` consecutive pieces (sequence rank = ring rank * ulysses + Ulysses rank)."""
    check_seq_len(seq_len, layout, sp_size)
    if ulysses == 1:
        return _ring_ranges(layout, seq_len, sp_size, sp_rank, docs)
    check_ulysses(ulysses, sp_size)
    ring_rank, piece = divmod(sp_rank, ulysses)
    n = seq_len // sp_size
    return _cut(_ring_ranges(layout, seq_len, sp_size // ulysses, ring_rank, docs), piece * n, n)


def _ring_ranges(layout: Layout, seq_len: int, sp_size: int, sp_rank: int, docs) -> tuple[tuple[int, int], ...]:
    if layout == "contiguous":
        c = seq_len // sp_size
        return ((sp_rank * c, c),)
    if layout == "balanced" and docs is not None:
        c = seq_len // num_chunks(layout, sp_size)
        return _merge_adjacent([(k * c, c) for k in balanced_chunks(seq_len, sp_size, docs)[sp_rank]])
    c = seq_len // (2 * sp_size)  # zigzag, and balanced without documents
    return ((sp_rank * c, c), ((2 * sp_size - 1 - sp_rank) * c, c))


def _cut(ranges, offset: int, n: int) -> tuple[tuple[int, int], ...]:
    """Local positions [offset, offset + n) of `ranges` (in local order), as ranges."""
    out, seen = [], 0
    for start, length in ranges:
        lo, hi = max(offset, seen), min(offset + n, seen + length)
        if lo < hi:
            out.append((start + lo - seen, hi - lo))
        seen += length
    return tuple(out)


def local_positions(
    layout: Layout,
    seq_len: int,
    sp_size: int,
    sp_rank: int,
    device=None,
    docs: tuple[int, ...] | None = None,
    ulysses: int = 1,
) -> torch.Tensor:
    """Global positions of the tokens rank `sp_rank` holds, in local order. # (S_local,)"""
    ranges = local_ranges(layout, seq_len, sp_size, sp_rank, docs, ulysses)
    return torch.cat([torch.arange(s, s + n, device=device) for s, n in ranges])


def _row_docs(layout: Layout, cu_seqlens, batch: int, seq_len: int) -> Docs:
    """Per-row documents when they decide the placement (balanced), else None."""
    if layout != "balanced" or cu_seqlens is None:
        return None
    return documents_per_row(cu_seqlens, batch, seq_len)


def _rows(x: torch.Tensor, dim: int, docs: Docs):
    """(row slice, that row's documents) pairs: the whole tensor at once without per-row placement."""
    if docs is None:
        return [(slice(None), None)]
    if dim == 0:
        raise BadValue(
            "the balanced layout places each batch row by its documents: rows on dim 0, sequence on dim >= 1"
        )
    return [(slice(b, b + 1), row) for b, row in enumerate(docs)]


def shard(x: torch.Tensor, group=None, dim: int = 1, layout: Layout = DEFAULT_LAYOUT, cu_seqlens=None) -> torch.Tensor:
    """Cut the full tensor `x` along `dim` and return this rank's part (a copy). With the
    balanced layout, `cu_seqlens` (as for ring_attention) places each row by its documents."""
    check_layout(layout)
    ulysses = ulysses_degree(group)
    _, sp_size, sp_rank = resolve_group(group)
    dim = dim % x.dim()
    docs = _row_docs(layout, cu_seqlens, x.shape[0], x.shape[dim])
    parts = []
    for rows, row_docs in _rows(x, dim, docs):
        ranges = local_ranges(layout, x.shape[dim], sp_size, sp_rank, row_docs, ulysses)
        parts.append(torch.cat([x[rows].narrow(dim, s, n) for s, n in ranges], dim=dim))
    return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]


def unshard(
    x_local: torch.Tensor, group=None, dim: int = 1, layout: Layout = DEFAULT_LAYOUT, cu_seqlens=None
) -> torch.Tensor:
    """Gather every rank's part of `x_local` along `dim` and return the full tensor in
    original order. Every rank must hold a part of the same shape. Not differentiable:
    use it to inspect outputs (e.g. full logits for evaluation)."""
    check_layout(layout)
    ulysses = ulysses_degree(group)
    group, sp_size, _ = resolve_group(group)
    if sp_size == 1:
        return x_local.clone()
    dim = dim % x_local.dim()
    parts = [torch.empty_like(x_local) for _ in range(sp_size)]
    dist.all_gather(parts, x_local.detach().contiguous(), group=group)
    seq_len = x_local.shape[dim] * sp_size
    docs = _row_docs(layout, cu_seqlens, x_local.shape[0], seq_len)
    rows_out = []
    for rows, row_docs in _rows(x_local, dim, docs):
        pieces: dict[int, torch.Tensor] = {}
        for rank, part in enumerate(parts):
            offset = 0
            for start, n in local_ranges(layout, seq_len, sp_size, rank, row_docs, ulysses):
                pieces[start] = part[rows].narrow(dim, offset, n)
                offset += n
        rows_out.append(torch.cat([pieces[s] for s in sorted(pieces)], dim=dim))
    return torch.cat(rows_out, dim=0) if len(rows_out) > 1 else rows_out[0]
