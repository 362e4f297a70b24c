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

from collections import deque
from collections.abc import Iterable, Iterator

import torch

from ringpatch.errors import BadValue


def pack_documents(
    docs: Iterable, seq_len: int, eos_id: int, min_doc_tokens: int = 0, sources: int = 0, whole=frozenset()
) -> Iterator[dict[str, list[int]]]:
    """Yield {"input_ids": seq_len tokens, "doc_position_ids": positions restarting at each document}.

    Documents shorter than `min_doc_tokens` are skipped; each kept document is followed by
    `eos_id`. A document longer than the room left continues into the next sequence, where
    its positions restart at 0. sources > 0: `docs` are (ids, source index) pairs, and each
    sequence also has "source_tokens", its tokens from each of the `sources` sources. A document
    of a source in `whole` (a task whose question must see its context) that fits in one sequence
    is never cut: when the room left is too small it waits for the next sequence, which starts
    with it, while the documents after it fill the room (at most WAITING wait at once)."""
    if seq_len < 2:
        raise BadValue(f"seq_len must be at least 2, got {seq_len}")
    ids: list[int] = []
    pos: list[int] = []
    counts = [0] * sources
    waiting: deque = deque()

    def place(tokens: list[int], label: int):
        nonlocal ids, pos, counts
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
                while waiting and len(waiting[0][0]) <= seq_len - len(ids):  # waiting documents go first
                    held, held_label = waiting.popleft()
                    yield from place(held, held_label)

    for doc in docs:
        doc, label = doc if sources else (doc, 0)
        if len(doc) < min_doc_tokens:
            continue
        tokens = list(doc) + [eos_id]
        if label in whole and len(tokens) <= seq_len and len(tokens) > seq_len - len(ids):
            waiting.append((tokens, label))
            if len(waiting) <= WAITING:
                continue
            tokens, label = waiting.popleft()  # too many wait (a mixture of whole documents only): cut the oldest
        yield from place(tokens, label)


WAITING = 64


def restart_first_document(positions: torch.Tensor) -> torch.Tensor:
    """Document positions of a window cut from packed rows: the document the window starts
    inside restarts at 0, as a packed sequence's first document does. # (B, n)"""
    positions = positions.clone()
    for row in positions:
        first_reset = int((row[1:] == 0).nonzero()[0]) + 1 if bool((row[1:] == 0).any()) else len(row)
        row[:first_reset] -= row[0].item()
    return positions
