"""patch_model + shard_batch: loss on every rank equals the full-sequence loss and gradients
averaged over the group equal the unpatched eager model's (real gloo groups, tiny models)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import ringpatch
from tests.helpers import ROOT
from tests.helpers.models import CONFIGS, build
from tests.helpers.models import batch as make_batch
from tests.helpers.procs import spawn

pytestmark = pytest.mark.multiprocess

LOSS_REL = 1e-5
GRAD_REL = 1e-4


def _reference(model, full):
    model.zero_grad()
    out = model(**full)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _ring(model, full, layout, world, group=None):
    model.zero_grad()
    out = model(**ringpatch.shard_batch(full, group=group, layout=layout))
    out.loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)  # what DDP / DeepSpeed do over the group: average
        grads[n] = g / world
    return out.loss.detach(), grads


def _compare(label, ref, got):
    (ref_loss, ref_grads), (loss, grads) = ref, got
    err = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
    assert err <= LOSS_REL, f"{label}: loss {loss.item():.7f} vs {ref_loss.item():.7f} (rel {err:.1e} > {LOSS_REL})"
    for name, want in ref_grads.items():
        g_err = ((grads[name] - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        assert g_err <= GRAD_REL, f"{label}: grad {name} relative error {g_err:.1e} > {GRAD_REL}"


def _check_models(rank, world, layout):
    cases = [
        ("plain", dict()),
        ("padded-batch", dict(seq=35, pad_last_row=6)),  # needs padding to the chunk count too
        ("one-row", dict(rows=1, seq=40, prompt=0)),
    ]
    for name in CONFIGS:
        ref_model = build(name)
        model = ringpatch.patch_model(build(name), layout=layout)
        for case, kwargs in cases:
            full = make_batch(**kwargs)
            label = f"{name} P={world} {layout} {case}"
            _compare(label, _reference(ref_model, full), _ring(model, full, layout, world))


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_loss_and_gradients_match_unpatched(world, layout):
    spawn(_check_models, world, layout)


def _check_ulysses(rank, world, layout):
    """Ulysses x ring (U=2 x R=2): the same contract as the plain ring."""
    group = ringpatch.ulysses_ring_group(2)
    for name in ("llama", "mistral-w3", "mistral-w20"):
        ref_model = build(name)
        model = ringpatch.patch_model(build(name), group=group, layout=layout)
        for case, kwargs in (("plain", dict()), ("padded-batch", dict(seq=35, pad_last_row=6))):
            full = make_batch(**kwargs)
            label = f"{name} U=2 x R=2 {layout} {case}"
            _compare(label, _reference(ref_model, full), _ring(model, full, layout, world, group))
        if layout == "zigzag":  # (contiguous over R, cut in U, is contiguous over N: the same cut)
            with pytest.raises(ValueError, match="not this rank's part .*ulysses 2"):
                model(**ringpatch.shard_batch(make_batch(), layout=layout))  # cut for the plain ring of 4


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ulysses_ring_loss_and_gradients_match_unpatched(layout):
    spawn(_check_ulysses, 4, layout)


def _check_checkpointing_and_reload(rank, world):
    full = make_batch()
    ref = _reference(build("llama"), full)
    for reentrant in (True, False):
        model = build("llama")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        ringpatch.patch_model(model)
        _compare(f"checkpointing reentrant={reentrant}", ref, _ring(model, full, "zigzag", world))
    # save_pretrained -> from_pretrained -> patch: the real loading path
    from transformers import AutoModelForCausalLM

    store = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(store)
    if rank == 0:
        build("llama").save_pretrained(store[0])
    dist.barrier()
    loaded = AutoModelForCausalLM.from_pretrained(store[0], attn_implementation="sdpa")
    ref_logits = loaded(**full).logits.detach()
    ringpatch.patch_model(loaded)
    _compare("from_pretrained", ref, _ring(loaded, full, "zigzag", world))
    # full logits for evaluation: gather every rank's part, drop shard_batch's padding
    local_logits = loaded(**ringpatch.shard_batch(full)).logits.detach()
    logits = ringpatch.unshard(local_logits, dim=1)[:, : full["input_ids"].shape[1]]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    # unpatch restores the previous implementation and the plain forward
    ringpatch.unpatch_model(loaded)
    assert loaded.config._attn_implementation == "sdpa"
    out = loaded(**full)
    assert abs(out.loss.item() - ref[0].item()) <= LOSS_REL * abs(ref[0].item())


def test_checkpointing_reload_unpatch():
    spawn(_check_checkpointing_and_reload, 2)


def _check_bf16(rank, world):
    full = make_batch()
    ref_loss, _ = _reference(build("mistral-w3"), full)
    model = ringpatch.patch_model(build("mistral-w3", dtype=torch.bfloat16))
    out = model(**ringpatch.shard_batch(full))
    out.loss.backward()
    assert out.loss.dtype == torch.float32  # HF upcasts logits for the loss
    err = abs(out.loss.item() - ref_loss.item()) / ref_loss.item()
    assert err <= 1e-2, f"bfloat16 loss {out.loss.item()} vs float32 {ref_loss.item()} (rel {err:.1e})"
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_bfloat16_trains():
    spawn(_check_bf16, 2)


@pytest.mark.e2e
@pytest.mark.parametrize("script", ["examples/train_plain.py", "examples/train_deepspeed.py"])
def test_own_script_under_torchrun(tmp_path, script):
    """The README patterns under torchrun: 2 processes give the losses of 1 process."""
    import subprocess
    import sys

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    losses = {}
    for nproc in (1, 2):
        out = tmp_path / f"losses{nproc}.txt"
        cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", script, "--steps", "3"]
        proc = subprocess.run([*cmd, "--losses", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        losses[nproc] = [float(x) for x in out.read_text().split()]
    assert len(losses[2]) == 3
    torch.testing.assert_close(torch.tensor(losses[2]), torch.tensor(losses[1]), rtol=1e-5, atol=0)
