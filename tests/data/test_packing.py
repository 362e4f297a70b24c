"""Packing invariants: every token once, in order, with document boundaries recorded."""

from __future__ import annotations

import random

import pytest
import torch

from ringpatch.data.packing import pack_documents, restart_first_document

pytestmark = pytest.mark.unit

EOS = 0


def _docs(n=40, seed=0):
    rng = random.Random(seed)
    return [[rng.randint(1, 99) for _ in range(rng.randint(1, 60))] for _ in range(n)]


@pytest.mark.parametrize("seq_len, min_doc", [(16, 0), (37, 10), (200, 0), (2, 0)])
def test_packing_keeps_every_token_once_in_order(seq_len, min_doc):
    docs = _docs()
    packed = list(pack_documents(docs, seq_len, EOS, min_doc_tokens=min_doc))
    kept = [d for d in docs if len(d) >= min_doc]
    stream = [t for d in kept for t in [*d, EOS]]
    assert all(len(p["input_ids"]) == len(p["doc_position_ids"]) == seq_len for p in packed)
    flat = [t for p in packed for t in p["input_ids"]]
    assert flat == stream[: len(flat)] and len(stream) - len(flat) < seq_len  # only the last partial dropped
    # boundaries: positions restart exactly where a kept document starts, and where a sequence starts
    doc_starts, at = set(), 0
    for d in kept:
        doc_starts.add(at)
        at += len(d) + 1
    expected, pos = [], 0
    for i in range(len(flat)):
        pos = 0 if i in doc_starts or i % seq_len == 0 else pos + 1
        expected.append(pos)
    assert [q for p in packed for q in p["doc_position_ids"]] == expected


def test_packing_rejects_tiny_lengths():
    with pytest.raises(ValueError, match=r"seq_len must be at least 2, got 1"):
        list(pack_documents([[1]], 1, EOS))


def test_a_window_cut_inside_a_document_restarts_it():
    positions = torch.tensor([[5, 6, 7, 0, 1, 0], [2, 3, 4, 5, 6, 7], [0, 1, 2, 0, 1, 2]])
    assert restart_first_document(positions).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2]]
