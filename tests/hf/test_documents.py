"""Packed documents through patch_model + shard_batch: each rank's loss and the group-averaged
gradients equal those of the unpatched model run on every document alone, token-weighted over
the batch (real gloo groups, tiny models, different splits per row)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ringpatch
from tests.helpers.models import VOCAB, build
from tests.helpers.procs import spawn
from tests.hf.test_patch import _compare, _ring  # the same loss and gradient bounds

pytestmark = pytest.mark.multiprocess

SPLITS = [[10, 1, 20, 6], [2, 35]]  # per row: 37 tokens, a 1-token and a 2-token document


def _packed(seed=3):
    """input_ids, labels and per-document position_ids of 2 rows packing SPLITS."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (len(SPLITS), sum(SPLITS[0])), generator=g)
    positions = torch.tensor([[p for n in row for p in range(n)] for row in SPLITS])
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": positions}


def _documents_alone(model, batch):
    """Loss and gradients of the unpatched model run on each document by itself: the sum of
    every document's next-token losses over the count of predicted tokens."""
    model.zero_grad()
    total, count = 0.0, 0
    for row, lengths in enumerate(SPLITS):
        start = 0
        for n in lengths:
            ids = batch["input_ids"][row, start : start + n][None]
            start += n
            if n < 2:
                continue  # a 1-token document predicts nothing
            logits = model(input_ids=ids).logits[0, :-1]
            total = total + F.cross_entropy(logits.float(), ids[0, 1:], reduction="sum")
            count += n - 1
    loss = total / count
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _check(rank, world, layout):
    batch = _packed()
    for name in ("llama", "mistral-w3", "qwen2-sliding"):
        ref = _documents_alone(build(name), batch)
        model = ringpatch.patch_model(build(name), layout=layout)
        _compare(f"{name} P={world} {layout}", ref, _ring(model, batch, layout, world))


@pytest.mark.parametrize("layout", ["zigzag", "balanced"])
@pytest.mark.parametrize("world", [2, 3])
def test_packed_documents_equal_each_document_alone(world, layout):
    spawn(_check, world, layout)


def _check_ulysses(rank, world):
    group = ringpatch.ulysses_ring_group(2)
    batch = _packed()
    for name, layout in (("llama", "balanced"), ("mistral-w3", "zigzag")):
        ref = _documents_alone(build(name), batch)
        model = ringpatch.patch_model(build(name), group=group, layout=layout)
        _compare(f"{name} U=2 x R=2 {layout}", ref, _ring(model, batch, layout, world, group))


def test_packed_documents_under_ulysses_ring():
    spawn(_check_ulysses, 4)


def _check_collator_and_chunked_loss(rank, world):
    """transformers' DataCollatorWithFlattening (position_ids, cu_seq_lens_q/k, seq_idx) gives the
    same batch; causal_lm_loss (chunked logits) gives the same loss and gradients."""
    from transformers import DataCollatorWithFlattening

    batch = _packed()
    features = []
    for row, lengths in enumerate(SPLITS):
        start = 0
        for n in lengths:
            features.append({"input_ids": batch["input_ids"][row, start : start + n].tolist()})
            start += n
    flat = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(features)
    ref = _documents_alone(build("llama"), batch)
    model = ringpatch.patch_model(build("llama"), layout="balanced")
    _compare("flattening collator", ref, _ring(model, dict(flat), "balanced", world))
    model.zero_grad()
    loss = ringpatch.causal_lm_loss(model, ringpatch.shard_batch(batch, layout="balanced"), chunk_tokens=5)
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        dist.all_reduce(p.grad)
        grads[n] = p.grad / world
    _compare("causal_lm_loss", ref, (loss.detach(), grads))


def test_flattening_collator_and_chunked_loss():
    spawn(_check_collator_and_chunked_loss, 2)
