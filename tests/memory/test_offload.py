"""Activation-checkpoint offload: the same loss and gradients, and the checkpointed layer inputs
go through the offload hooks instead of staying where autograd saved them."""

from __future__ import annotations

import pytest
import torch

from ringpatch.memory import offload
from ringpatch.memory.estimate import offloaded_bytes
from ringpatch.memory.offload import enable_checkpointing
from tests.helpers.models import batch, build

pytestmark = pytest.mark.unit


def _run(model, full):
    """Loss, gradients, and the shapes of the tensors autograd saved outside any offload hooks."""
    seen = []

    def pack(t):
        seen.append(tuple(t.shape))
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**full).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, seen


def test_offload_is_exact_and_moves_every_layer_input(monkeypatch):
    full = batch(rows=2, seq=24)
    plain = build("llama")
    plain.train()
    enable_checkpointing(plain, offload=False)
    model = build("llama")
    model.train()
    copies, back = [], []
    to_host, from_host = offload._to_host, offload._from_host

    def counted_to_host(t):
        copies.append(tuple(t.shape))
        return to_host(t)

    def counted_from_host(packed):
        restored = from_host(packed)
        back.append(restored.untyped_storage()._cdata != packed[1].untyped_storage()._cdata)
        return restored

    monkeypatch.setattr(offload, "_to_host", counted_to_host)
    monkeypatch.setattr(offload, "_from_host", counted_from_host)
    enable_checkpointing(model, offload=True)
    ref_loss, ref_grads, ref_seen = _run(plain, full)
    loss, grads, seen = _run(model, full)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=0, atol=0, msg=name)
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    layer_inputs = [s for s in copies if s == (2, 24, hidden)]
    assert len(layer_inputs) == layers  # every decoder layer's input went to the host copy
    assert ref_seen.count((2, 24, hidden)) - seen.count((2, 24, hidden)) == layers  # and not kept in place
    assert back and all(back)  # each comes back as a fresh copy, as it would to a GPU


def test_the_planner_counts_the_copies():
    """One host block per layer's input (RoPE's cos and sin are not the checkpoint's inputs: they
    stay on the device), rounded up to a power of two as torch's pinned allocator does."""
    cfg = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32)
    assert offloaded_bytes(cfg, 131072) == 32 * 131072 * 4096 * 2  # 1 GiB a layer: a power of two
    assert offloaded_bytes(cfg, 100000) == 32 * 2**30  # 781 MiB a layer, held in 1 GiB blocks
