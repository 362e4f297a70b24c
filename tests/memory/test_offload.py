"""Activation-checkpoint offload: the same loss and gradients, and the checkpointed layer inputs
go through the offload hooks instead of staying where autograd saved them."""

from __future__ import annotations

import pytest
import torch

from ringpatch.memory import offload
from ringpatch.memory.offload import enable_checkpointing
from ringpatch.plan.estimate import offloaded_bytes
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
    """One host buffer per layer's input (RoPE's cos and sin are not the checkpoint's inputs: they
    stay on the device), of exactly its bytes: no power-of-two rounding (HostBuffers)."""
    cfg = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32)
    assert offloaded_bytes(cfg, 131072) == 32 * 131072 * 4096 * 2  # 1 GiB a layer
    assert offloaded_bytes(cfg, 100000) == 32 * 100000 * 4096 * 2  # 781 MiB a layer, not 1 GiB


class _Pins:
    """cudaHostRegister/Unregister stand-ins: which host buffers are locked now."""

    def __init__(self):
        self.locked, self.unlocked = {}, 0

    def pin(self, host):
        self.locked[host.data_ptr()] = host.nbytes

    def unpin(self, host):
        del self.locked[host.data_ptr()]
        self.unlocked += 1


def _pooled_everywhere(monkeypatch):
    """The GPU path (HostBuffers) on this CPU: every offloaded input goes to a pooled buffer."""
    pins = _Pins()
    buffers = offload.HostBuffers(pin=pins.pin, unpin=pins.unpin)
    monkeypatch.setattr(offload, "HOST_BUFFERS", buffers)
    monkeypatch.setattr(offload, "_pooled", lambda t: True)
    return buffers, pins


def test_pooled_host_buffers_are_exact_sized_and_taken_again_every_step(monkeypatch):
    """The GPU path's buffers: one per checkpointed layer input, of exactly its bytes, locked once
    and taken again by the next step (no new locking), all free after backward; the loss and
    gradients of two steps on different data equal the plain checkpoint's, so a reused buffer
    never hands back the previous step's values."""
    plain = build("llama")
    plain.train()
    enable_checkpointing(plain, offload=False)
    model = build("llama")
    model.train()
    enable_checkpointing(model, offload=True)
    buffers, pins = _pooled_everywhere(monkeypatch)
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    for step in range(3):
        full = batch(rows=2, seq=24, seed=step)
        ref_loss, ref_grads, _ = _run(plain, full)
        loss, grads, _ = _run(model, full)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
        for name, want in ref_grads.items():
            torch.testing.assert_close(grads[name], want, rtol=0, atol=0, msg=f"step {step} {name}")
        assert buffers.registered == layers, (step, buffers.registered)  # locked in the first step only
        assert buffers.held_bytes == layers * 2 * 24 * hidden * 4 == sum(pins.locked.values())
        assert sum(len(free) for free in buffers.free.values()) == layers  # every one back after backward


def test_pooled_host_buffers_follow_a_new_length(monkeypatch):
    """A stage change (a longer sequence): the previous length's buffers are unlocked and freed
    when the new length asks and finds none of its size, so the host holds one stage's inputs."""
    model = build("llama")
    model.train()
    enable_checkpointing(model, offload=True)
    buffers, pins = _pooled_everywhere(monkeypatch)
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    _run(model, batch(rows=2, seq=24))
    _run(model, batch(rows=2, seq=40))
    assert pins.unlocked == layers and buffers.registered == 2 * layers
    assert buffers.held_bytes == layers * 2 * 40 * hidden * 4 == sum(pins.locked.values())
