"""Packed documents in a Hugging Face batch: where each row's documents start.

Three conventions say it, and shard_batch takes any of them (several must agree):
- position_ids that restart at 0 at every document (transformers' DataCollatorWithFlattening,
  TRL's padding-free packing): a row reads 0 1 2 0 1 0 1 2 3 ...;
- cu_seq_lens_q / cu_seq_lens_k: cumulative lengths over the rows laid end to end (the same
  collators with return_flash_attn_kwargs), with max_length_q / max_length_k beside them;
- seq_idx: the document index of every token (return_seq_idx).
Any other position layout (an offset start, positions that go back without restarting at 0)
is refused: the ring could not tell where documents begin.
"""

from __future__ import annotations

import torch

from ringpatch.attention.documents import documents_per_row
from ringpatch.errors import BadValue

FLATTENING_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def starts_from_positions(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, where documents start in position_ids that restart at 0 for each; anything else is refused."""
    starts = []
    for b, row in enumerate(position_ids.tolist()):
        bad = next((i for i, p in enumerate(row) if p != (row[i - 1] + 1 if i and p else 0)), None)
        if bad is not None:
            shown = row[max(0, bad - 3) : bad + 3]
            raise BadValue(
                f"position_ids row {b} reads {shown} around index {bad}: positions must count 0, 1, 2, ... and may "
                "restart at 0 where a packed document starts; offsets and other jumps are not supported (drop "
                "position_ids for one sequence numbered from 0, or restart them at 0 for each document)"
            )
        starts.append([i for i, p in enumerate(row) if p == 0])
    return starts


def _starts_from_cu_seqlens(batch, rows: int, seq_len: int) -> list[list[int]]:
    q, k = batch.get("cu_seq_lens_q"), batch.get("cu_seq_lens_k")
    if q is not None and k is not None and not torch.equal(torch.as_tensor(q).cpu(), torch.as_tensor(k).cpu()):
        raise BadValue("cu_seq_lens_q and cu_seq_lens_k differ; causal self-attention over packed documents needs one")
    docs = documents_per_row(q if q is not None else k, rows, seq_len)
    return [[0] if docs is None or docs[b] is None else list(docs[b]) for b in range(rows)]


def _starts_from_seq_idx(seq_idx: torch.Tensor) -> list[list[int]]:
    changes = seq_idx[:, 1:] != seq_idx[:, :-1]
    return [[0, *(i + 1 for i in row.nonzero().flatten().tolist())] for row in changes]


def document_starts(batch, seq_len: int) -> list[list[int]] | None:
    """Per row, where its documents start (0 first); None when the batch says nothing of documents.
    Every convention the batch carries must give the same boundaries."""
    rows = batch["input_ids"].shape[0]
    found = {}
    if batch.get("position_ids") is not None:
        found["position_ids"] = starts_from_positions(batch["position_ids"])
    if batch.get("cu_seq_lens_q") is not None or batch.get("cu_seq_lens_k") is not None:
        found["cu_seq_lens_q"] = _starts_from_cu_seqlens(batch, rows, seq_len)
    if batch.get("seq_idx") is not None:
        found["seq_idx"] = _starts_from_seq_idx(batch["seq_idx"])
    if not found:
        return None
    (first, starts), *others = found.items()
    for name, other in others:
        if other != starts:
            row = next(b for b in range(rows) if other[b] != starts[b])
            raise BadValue(
                f"{first} and {name} place the documents of row {row} differently ({starts[row][:8]} vs "
                f"{other[row][:8]}); pass one of them, or make them agree"
            )
    return starts
