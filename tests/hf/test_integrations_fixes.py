"""The paths that used to give a silently wrong loss or a misleading error: a training call
without labels (a trainer's own loss from this rank's logits) raises; autocast casts q, k, v;
PEFT LoRA works in either order; patch_model refuses to build a ring of one under a launcher."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import ringpatch
from tests.helpers.models import batch as make_batch
from tests.helpers.models import build
from tests.helpers.procs import spawn

pytestmark = pytest.mark.multiprocess


def _reference(model, full):
    model.zero_grad()
    out = model(**full)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _ring(model, full, world):
    model.zero_grad()
    out = model(**ringpatch.shard_batch(full))
    out.loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.clone()
            dist.all_reduce(g)
            grads[n] = g / world
    return out.loss.detach(), grads


def _close(ref, got, loss_rel=1e-5, grad_rel=1e-4):
    (ref_loss, ref_grads), (loss, grads) = ref, got
    assert abs(loss.item() - ref_loss.item()) <= loss_rel * abs(ref_loss.item()), (loss.item(), ref_loss.item())
    assert set(grads) == set(ref_grads) and grads
    for name, want in ref_grads.items():
        err = ((grads[name] - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        assert err <= grad_rel, (name, err)


def _label_free_training_raises(rank, world):
    full = make_batch(seq=32, rows=2)
    model = ringpatch.patch_model(build("llama"))
    local = ringpatch.shard_batch({"input_ids": full["input_ids"]})
    model.train()
    with pytest.raises(
        ValueError, match=r"called for training without labels: its logits cover only this rank's 16 of 32 tokens"
    ):
        model(**local)
    with torch.no_grad():  # inference (ring prefill, generation-free eval) stays allowed
        model(**local)
    model.eval()
    model(**local)
    allowed = ringpatch.patch_model(build("llama"), local_logits=True).train()
    assert allowed(**local).logits.shape[1] == 16


def test_a_training_call_without_labels_raises():
    spawn(_label_free_training_raises, 2)


def _autocast(rank, world):
    full = make_batch(seq=32, rows=2)
    ref_model, model = build("llama"), ringpatch.patch_model(build("llama"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference(ref_model, full)
        got = _ring(model, full, world)
    _close(ref, got, loss_rel=1e-2, grad_rel=5e-2)  # bf16 attention on both sides, different summation order


def test_autocast_casts_q_k_v_to_its_dtype():
    spawn(_autocast, 2)


def _peft_both_orders(rank, world):
    from peft import LoraConfig, get_peft_model

    def lora(model):
        torch.manual_seed(1)
        peft_model = get_peft_model(
            model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        return peft_model

    full = make_batch(seq=32, rows=2)
    ref = _reference(lora(build("llama")), full)
    patched_first = lora(ringpatch.patch_model(build("llama")))
    _close(ref, _ring(patched_first, full, world))
    peft_first = ringpatch.patch_model(lora(build("llama")))
    assert type(peft_first).__module__.startswith("peft")  # the wrapper comes back, its base model patched
    _close(ref, _ring(peft_first, full, world))
    ringpatch.unpatch_model(peft_first)
    assert peft_first.get_base_model().config._attn_implementation != "ringpatch"


def test_peft_lora_in_either_order():
    spawn(_peft_both_orders, 2)


@pytest.mark.unit
def test_patch_model_under_a_launcher_without_a_group_raises(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE is 4 but no process group exists yet"):
        ringpatch.patch_model(build("llama"))
