"""Packing tokenised documents into ring-ready sequences.

Packing concatenates documents with EOS between them and cuts fixed-length sequences, so
no token is lost at a batch boundary (the whole stream is one generator; only the final
partial sequence is dropped). Each sequence records its document boundaries as
per-document position resets (transformers' convention for packed sequences), which the
trainer's document masking reads (data.document_masking); without it training numbers
positions across the whole packed sequence, as continual pretraining does. A document cut
by a sequence boundary continues in the next sequence as a document of its own, positions
restarting at 0: no sequence begins with an offset.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def pack_documents(
    docs: Iterable, seq_len: int, eos_id: int, min_doc_tokens: int = 0, sources: int = 0
) -> Iterator[dict[str, list[int]]]:
    """Yield {"input_ids": seq_len tokens, "doc_position_ids": positions restarting at each document}.

    Documents shorter than `min_doc_tokens` are skipped; each kept document is followed by
    `eos_id`. A document longer than the room left continues into the next sequence, where
    its positions restart at 0. sources > 0: `docs` are (ids, source index) pairs, and each
    sequence also has "source_tokens", its tokens from each of the `sources` sources."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    ids: list[int] = []
    pos: list[int] = []
    counts = [0] * sources
    for doc in docs:
        doc, label = doc if sources else (doc, 0)
        if len(doc) < min_doc_tokens:
            continue
        tokens = list(doc) + [eos_id]
        start = 0
        while start < len(tokens):  # each pass fills the current sequence with the next piece
            take = min(seq_len - len(ids), len(tokens) - start)
            ids += tokens[start : start + take]
            pos += range(take)
            if sources:
                counts[label] += take
            start += take
            if len(ids) == seq_len:
                yield {"input_ids": ids, "doc_position_ids": pos, **({"source_tokens": counts} if sources else {})}
                ids, pos, counts = [], [], [0] * sources


def restart_first_document(positions: torch.Tensor) -> torch.Tensor:
    """Document positions of a window cut from packed rows: the document the window starts
    inside restarts at 0, as a packed sequence's first document does. # (B, n)"""
    positions = positions.clone()
    for row in positions:
        first_reset = int((row[1:] == 0).nonzero()[0]) + 1 if bool((row[1:] == 0).any()) else len(row)
        row[:first_reset] -= row[0].item()
    return positions
