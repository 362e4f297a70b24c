"""Packing tokenised documents into ring-ready sequences.

Packing concatenates documents with EOS between them and cuts fixed-length sequences, so
no token is lost at a batch boundary (the whole stream is one generator; only the final
partial sequence is dropped). Each sequence records its document boundaries as
per-document position resets (transformers' convention for packed sequences), so a later
document-masked attention can use them; by default training numbers positions across the
whole packed sequence, as continual pretraining does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def pack_documents(
    docs: Iterable[list[int]], seq_len: int, eos_id: int, min_doc_tokens: int = 0
) -> Iterator[dict[str, list[int]]]:
    """Yield {"input_ids": seq_len tokens, "doc_position_ids": positions restarting at each document}.

    Documents shorter than `min_doc_tokens` are skipped; each kept document is followed by
    `eos_id`. A document longer than `seq_len` continues into the next sequence (its
    positions continue too)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    ids: list[int] = []
    pos: list[int] = []
    for doc in docs:
        if len(doc) < min_doc_tokens:
            continue
        tokens = list(doc) + [eos_id]
        start = 0
        while start < len(tokens):
            take = min(seq_len - len(ids), len(tokens) - start)
            ids += tokens[start : start + take]
            pos += range(start, start + take)
            start += take
            if len(ids) == seq_len:
                yield {"input_ids": ids, "doc_position_ids": pos}
                ids, pos = [], []
