"""Document boundaries of packed sequences: checked once, then carried per batch row.

Input is the cumulative-length convention of transformers' padding-free collators (and of
flash-attn's varlen functions): one 1-D list of boundaries over the batch's rows laid end to
end, [0, end of doc 1, end of doc 2, ..., batch * seq_len], in global (unsharded) positions.
Every row boundary must be a document boundary: a document cannot span two rows. Inside
ringpatch each row keeps the start positions of its documents, e.g. (0, 5, 17); a row that is
one document is None, which is the plain causal case.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from ringpatch.errors import BadType, BadValue

Docs = tuple[tuple[int, ...] | None, ...] | None


def boundaries(cu_seqlens) -> tuple[int, ...]:
    """The boundaries as ints, read from the device once (a tensor) or taken as they are."""
    return tuple(_as_list(cu_seqlens))


def _as_list(cu_seqlens) -> list[int]:
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() or cu_seqlens.is_complex():
            raise BadValue(
                f"cu_seqlens must be a 1-D integer tensor of document boundaries, got {cu_seqlens.dtype} "
                f"of shape {tuple(cu_seqlens.shape)}"
            )
        return [int(x) for x in cu_seqlens.tolist()]
    if isinstance(cu_seqlens, Sequence) and all(isinstance(x, int) and not isinstance(x, bool) for x in cu_seqlens):
        return list(cu_seqlens)
    raise BadType(f"cu_seqlens must be a 1-D integer tensor or a sequence of ints, got {type(cu_seqlens).__name__}")


def documents_per_row(cu_seqlens, batch: int, seq_len: int) -> Docs:
    """Per row, the start positions of its documents (None for a one-document row); None when
    no row has more than one document. Raises ValueError naming the boundaries that are wrong."""
    if cu_seqlens is None:
        return None
    bounds = _as_list(cu_seqlens)
    total = batch * seq_len
    shown = bounds if len(bounds) <= 12 else [*bounds[:6], "...", *bounds[-3:]]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
        raise BadValue(
            f"document boundaries {shown} must run from 0 to {total} ({batch} row(s) x {seq_len} tokens, "
            "the full padded length, rows laid end to end)"
        )
    bad = next((i for i in range(1, len(bounds)) if bounds[i] <= bounds[i - 1]), None)
    if bad is not None:
        raise BadValue(
            f"document boundaries must increase: position {bad} holds {bounds[bad]} after {bounds[bad - 1]} "
            f"(boundaries {shown}); empty documents are not allowed"
        )
    present = set(bounds)
    missing = [r * seq_len for r in range(1, batch) if r * seq_len not in present]
    if missing:
        raise BadValue(
            f"document boundaries {shown} let a document span two rows (no boundary at {missing}); "
            f"every row of {seq_len} tokens must start a new document"
        )
    rows = []
    for r in range(batch):
        starts = tuple(x - r * seq_len for x in bounds if r * seq_len <= x < (r + 1) * seq_len)
        rows.append(None if starts == (0,) else starts)
    return None if all(row is None for row in rows) else tuple(rows)


def docs_digest(docs: Docs) -> int:
    """A checksum of the boundaries, so that the ranks of a group can compare them cheaply."""
    if docs is None:
        return 0
    flat = [x for row in docs for x in (*(row or (-1,)), -2)]  # -1: one document, -2: end of row
    return zlib.crc32(",".join(map(str, flat)).encode()) + 1


def positions_in_documents(positions: torch.Tensor, starts: tuple[int, ...] | None) -> torch.Tensor:
    """Each global position's offset in its own document (the RoPE position of a packed token)."""
    if starts is None:
        return positions
    s = torch.tensor(starts, device=positions.device)
    return positions - s[torch.searchsorted(s, positions, right=True) - 1]
