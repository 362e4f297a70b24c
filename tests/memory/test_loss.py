"""The chunked loss equals the plain loss in value and gradients, on a ring too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ringpatch
from tests.helpers.models import batch as make_batch
from tests.helpers.models import build, gemma2_config
from tests.helpers.procs import spawn
from tests.hf.test_patch import _compare, _reference

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_cross_entropy_matches_plain(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 37), generator=g)
    labels[:, :4] = -100
    plain = F.cross_entropy((hidden @ weight.T).reshape(-1, 50), labels.reshape(-1), reduction="sum")
    want = torch.autograd.grad(plain, (hidden, weight))
    got_loss = ringpatch.chunked_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
    got = torch.autograd.grad(got_loss, (hidden, weight))
    torch.testing.assert_close(got_loss.double(), plain, rtol=1e-6, atol=0)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def _check_ring_chunked(rank, world):
    full = make_batch(pad_last_row=4)
    for name in ("llama", "qwen3"):
        ref = _reference(build(name), full)
        model = ringpatch.patch_model(build(name))
        model.zero_grad()
        loss = ringpatch.causal_lm_loss(model, ringpatch.shard_batch(full), chunk_tokens=8)
        loss.backward()
        grads = {}
        for n, p in model.named_parameters():
            g = p.grad.clone()
            torch.distributed.all_reduce(g)
            grads[n] = g / world
        _compare(f"{name} chunked loss P={world}", ref, (loss.detach(), grads))


@pytest.mark.multiprocess
@pytest.mark.parametrize("world", [1, 2])
def test_causal_lm_loss_on_ring_matches_unpatched(world):
    spawn(_check_ring_chunked, world)


def test_causal_lm_loss_refuses_unknown_heads_and_partial_batches():
    from transformers import AutoModelForCausalLM

    gemma = AutoModelForCausalLM.from_config(gemma2_config())
    with pytest.raises(NotImplementedError, match=r"model type 'gemma2' may scale or cap its logits"):
        ringpatch.causal_lm_loss(gemma, {})
    model = ringpatch.patch_model(build("llama"))
    with pytest.raises(ValueError, match=r"batch lacks \['shift_labels', 'num_items_in_batch'\]"):
        ringpatch.causal_lm_loss(model, ringpatch.shard_batch({"input_ids": make_batch()["input_ids"]}))
