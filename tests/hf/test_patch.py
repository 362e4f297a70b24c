"""patch_model + shard_batch: loss on every rank equals the full-sequence loss and gradients
averaged over the group equal the unpatched eager model's (real gloo groups, tiny models)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import ringpatch
from tests.helpers import HANG_S, ROOT
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


def _ring_forwards(monkeypatch_target):
    """Count the ring forwards: wraps attention.ring.ring_forward, returns the counter."""
    import ringpatch.attention.ring as ring

    calls = {"n": 0}
    real = ring.ring_forward

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch_target.ring_forward = counting
    return calls


def _check_keep_attention(rank, world, ulysses):
    """Attention-aware checkpointing: the checkpoint's recompute takes each layer's kept output, so
    backward runs no ring forward; loss and gradients are those of full-layer checkpointing, bit for
    bit, and match the unpatched model."""
    import ringpatch.attention.ring as ring

    calls = _ring_forwards(ring)
    group = ringpatch.ulysses_ring_group(ulysses) if ulysses > 1 else None
    full = make_batch()
    for name in ("llama", "mistral-w3") if ulysses == 1 else ("llama",):
        ref = _reference(build(name), full)
        runs = {}
        for keep in (False, True):
            model = build(name)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            ringpatch.patch_model(model, group=group, keep_attention=keep)
            calls["n"] = 0
            runs[keep] = _ring(model, full, "zigzag", world, group)
            runs[keep] += (calls["n"],)
        layers = build(name).config.num_hidden_layers
        assert runs[False][2] == 2 * layers and runs[True][2] == layers, (runs[False][2], runs[True][2])
        torch.testing.assert_close(runs[True][0], runs[False][0], rtol=0, atol=0)
        for n, g in runs[False][1].items():
            torch.testing.assert_close(runs[True][1][n], g, rtol=0, atol=0, msg=n)
        _compare(f"{name} keep_attention U={ulysses}", ref, runs[True][:2])
    # two forwards, one backward (losses summed), after a forward never backwarded: each layer's
    # recompute takes its own forward's output, found by content, never the other's
    other = make_batch(seed=7)
    grads, counts = {}, {}
    for keep in (False, True):
        model = build("llama")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ringpatch.patch_model(model, group=group, keep_attention=keep)
        model(**ringpatch.shard_batch(make_batch(seed=9), group=group))  # no backward
        calls["n"] = 0
        loss = sum(model(**ringpatch.shard_batch(b, group=group)).loss for b in (full, other))
        loss.backward()
        counts[keep] = calls["n"]
        grads[keep] = {n: p.grad.clone() for n, p in model.named_parameters()}
    layers = build("llama").config.num_hidden_layers
    assert (counts[False], counts[True]) == (4 * layers, 2 * layers)
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=0, atol=0, msg=n)
    model = ringpatch.patch_model(build("llama"), group=group, keep_attention=True)
    model.train()
    with pytest.raises(
        ValueError, match=r"keep_attention=True\) keeps attention outputs .* no activation checkpointing"
    ):
        model(**ringpatch.shard_batch(full, group=group))


@pytest.mark.parametrize("world, ulysses", [(2, 1)])  # Ulysses x ring + keep_attention: tests/train/test_train.py
def test_keep_attention_skips_the_ring_in_the_recompute(world, ulysses):
    spawn(_check_keep_attention, world, ulysses)


# contiguous over R cut into U pieces is contiguous over N: the plain ring's cut, tested above
@pytest.mark.parametrize("layout", ["zigzag"])
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
@pytest.mark.parametrize(
    "script", ["examples/train_plain.py", "examples/train_deepspeed.py", "examples/train_fsdp2.py"]
)
def test_own_script_under_torchrun(tmp_path, script):
    """The README patterns under torchrun: 2 processes give the losses of 1 process."""
    import subprocess
    import sys

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    losses = {}
    for nproc in (1, 2):
        out = tmp_path / f"losses{nproc}.txt"
        cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", script, "--steps", "3"]
        proc = subprocess.run([*cmd, "--losses", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        losses[nproc] = [float(x) for x in out.read_text().split()]
    assert len(losses[2]) == 3
    torch.testing.assert_close(torch.tensor(losses[2]), torch.tensor(losses[1]), rtol=1e-5, atol=0)
