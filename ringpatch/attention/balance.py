"""The document-aware placement behind the "balanced" layout.

With packed documents the zigzag layout no longer gives every rank the same work: a query
attends only to its own document, so a rank whose chunks fall at the ends of long documents
does far more than one whose chunks hold the starts of short ones (bench/documents.py at
S = 32K: worst rank 1.12-2.21x the mean for lognormal length mixes on 2-8 ranks; balanced
1.004-1.014x).
"balanced" cuts the sequence into 8 chunks per rank, counts the attended (query, key) pairs of
each chunk under a causal mask and the documents, and deals the chunks out largest first, each
to the rank with the least work so far that still has room (every rank holds the same number
of chunks, so the same number of tokens). Positions travel in position_ids, so any placement is
exact; this one is a pure function of the boundaries, computed alike on every rank. With one
document per row it is the zigzag placement. Load balancing by reordering tokens is how
ByteScale, WLB-LLM and FlexSP treat variable-length documents too.
"""

from __future__ import annotations

import functools

import torch

CHUNKS_PER_RANK = 8
"""Finer chunks balance better (worst/mean up to about 1.2 at 4 per rank, 1.03 at 8, 1.005 at
16, in a study at S = 8K over the bench's mixes) but cut each ring step into more kernel calls."""


def chunk_work(seq_len: int, chunks: int, docs: tuple[int, ...]) -> list[int]:
    """Attended (query, key) pairs of each of `chunks` equal chunks: causal, within documents."""
    pos = torch.arange(seq_len)
    starts = torch.tensor(docs)
    start_of = starts[torch.searchsorted(starts, pos, right=True) - 1]  # (S,) start of each token's document
    return (pos - start_of + 1).view(chunks, -1).sum(1).tolist()


@functools.lru_cache(maxsize=64)
def balanced_chunks(seq_len: int, sp_size: int, docs: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """For each rank, the chunk indices it holds (increasing), out of CHUNKS_PER_RANK * sp_size."""
    chunks = CHUNKS_PER_RANK * sp_size
    work = chunk_work(seq_len, chunks, docs)
    load, held = [0] * sp_size, [[] for _ in range(sp_size)]
    for k in sorted(range(chunks), key=lambda k: (-work[k], k)):
        rank = min((r for r in range(sp_size) if len(held[r]) < CHUNKS_PER_RANK), key=lambda r: (load[r], r))
        load[rank] += work[k]
        held[rank].append(k)
    return tuple(tuple(sorted(ids)) for ids in held)
