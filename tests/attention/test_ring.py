"""Ring attention against a full-sequence float64 reference, on real gloo groups."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import ringpatch
from tests.helpers.procs import spawn
from tests.helpers.reference import attention, rel_err, rms_err, visible

pytestmark = pytest.mark.multiprocess

SEQ = 96  # P=4 zigzag: chunks of 12; contiguous: 24
WINDOWS = (None, 5, 40)  # smaller and larger than a chunk
HEADS = ((4, 4), (4, 2), (4, 1))  # MHA, GQA, MQA
FP32_REL = 1e-5


def _inputs(seed, batch, heads, kv_heads, dim=16, seq=SEQ):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, seq, h, dim) for h in (heads, kv_heads, kv_heads, heads)]
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _reference(q, k, v, dout, causal, window):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = attention(q, k, v, causal, window)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _monolithic(q, k, v, dout, causal, window, dtype):
    """One-process fused attention in `dtype`: the bar the ring is held to in bf16."""
    q, k, v = (x.to(dtype).transpose(1, 2).requires_grad_() for x in (q, k, v))
    mask = visible(q.shape[2], causal, window) if window is not None else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=True)
    out.backward(dout.to(dtype).transpose(1, 2))
    return [x.transpose(1, 2) for x in (out.detach(), q.grad, k.grad, v.grad)]


def _ring(q, k, v, dout, causal, window, layout, dtype):
    q, k, v = (ringpatch.shard(x.to(dtype), layout=layout).requires_grad_() for x in (q, k, v))
    out = ringpatch.ring_attention(q, k, v, causal=causal, window=window, layout=layout)
    out.backward(ringpatch.shard(dout.to(dtype), layout=layout))
    return [ringpatch.unshard(x.detach(), layout=layout) for x in (out, q.grad, k.grad, v.grad)]


def _check_parity(rank, world, layout, group_bytes=None):
    """group_bytes: force the ring to run one head group at a time (ring.GROUP_BYTES: 1 byte makes
    every K/V head a group of its own)."""
    if group_bytes is not None:
        from ringpatch.attention import ring

        ring.GROUP_BYTES = group_bytes
    names = ("out", "dq", "dk", "dv")
    cases = itertools.product((True, False), WINDOWS, HEADS, (1, 2))
    for case_id, (causal, window, (h, hkv), batch) in enumerate(cases):
        q, k, v, dout = _inputs(case_id, batch, h, hkv)
        ref = _reference(q, k, v, dout, causal, window)
        label = f"P={world} {layout} causal={causal} window={window} heads={h}/{hkv} batch={batch}"
        for name, got, want in zip(
            names, _ring(q, k, v, dout, causal, window, layout, torch.float32), ref, strict=True
        ):
            assert got.dtype == torch.float32
            err = rel_err(got, want)
            assert err <= FP32_REL, f"{label} float32 {name}: relative error {err:.2e} > {FP32_REL}"
        ring16 = _ring(q, k, v, dout, causal, window, layout, torch.bfloat16)
        mono16 = _monolithic(q, k, v, dout, causal, window, torch.bfloat16)
        for name, got, mono, want in zip(names, ring16, mono16, ref, strict=True):
            assert got.dtype == torch.bfloat16
            assert rms_err(got, want) <= rms_err(mono, want), (
                f"{label} bfloat16 {name}: ring rms error {rms_err(got, want):.3e} "
                f"> monolithic bfloat16 {rms_err(mono, want):.3e}"
            )


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_parity_with_full_attention(world, layout):
    spawn(_check_parity, world, layout)


@pytest.mark.parametrize("world", [1, 3])
def test_parity_one_head_group_at_a_time(world):
    """The ring over K/V head groups in turn (each K/V head alone here) equals full attention."""
    from ringpatch.attention.ring import head_groups

    assert head_groups((1, 4096, 32, 128), 8, budget=8 * 2**20) == 8  # Llama-3-8B's heads: groups of 4 + 1
    assert head_groups((1, 4096, 32, 128), 8, budget=64 * 2**20) == 1
    spawn(_check_parity, world, "zigzag", 1)


def _stack(h, layers, fn):
    """Pre-norm residual blocks, as in a transformer, so the chain stays well conditioned."""
    for _ in range(layers):
        n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True))
        h = h + fn(n, 0.5 * n, n)
    return h


def _check_stacked(rank, world, layout):
    """8 chained attention layers: the error stays within the single-layer bound."""
    layers = 8
    (x,) = _inputs(7, 2, 4, 4)[:1]
    ref_x = x.clone().requires_grad_()
    ref = _stack(ref_x, layers, lambda q, k, v: attention(q, k, v, True, None))
    ref.backward(torch.ones_like(ref))
    for dtype in (torch.float32, torch.bfloat16):
        xl = ringpatch.shard(x.to(dtype), layout=layout).requires_grad_()
        out = _stack(xl, layers, lambda q, k, v: ringpatch.ring_attention(q, k, v, layout=layout))
        out.backward(torch.ones_like(out))
        got_out, got_dx = (ringpatch.unshard(t.detach(), layout=layout) for t in (out, xl.grad))
        if dtype == torch.float32:
            for name, got, want in (("out", got_out, ref), ("dx", got_dx, ref_x.grad)):
                err = rel_err(got, want)
                assert err <= FP32_REL, f"stacked P={world} {layout} {name}: relative error {err:.2e} > {FP32_REL}"
        else:
            mx = x.to(dtype).requires_grad_()

            def mono(q, k, v):
                return F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
                ).transpose(1, 2)

            mout = _stack(mx, layers, mono)
            mout.backward(torch.ones_like(mout))
            for name, got, m, want in (("out", got_out, mout, ref), ("dx", got_dx, mx.grad, ref_x.grad)):
                assert rms_err(got, want) <= rms_err(m.detach(), want), (
                    f"stacked bf16 {name}: ring {rms_err(got, want):.3e} > monolithic {rms_err(m.detach(), want):.3e}"
                )


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_stacked_layers_no_error_growth(layout):
    spawn(_check_stacked, 4, layout)


def _check_roundtrip(rank, world):
    x = torch.arange(2 * 24 * 3, dtype=torch.float32).view(2, 24, 3)
    for layout, dim in itertools.product(("zigzag", "contiguous"), (1, -2, 0)):
        if dim == 0:
            x_dim = torch.arange(24 * 2, dtype=torch.float32).view(24, 2)
        else:
            x_dim = x
        local = ringpatch.shard(x_dim, dim=dim, layout=layout)
        chunks = 2 * world if layout == "zigzag" else world
        c = x_dim.shape[dim] // chunks
        ids = (rank, 2 * world - 1 - rank) if layout == "zigzag" else (rank,)
        expected = torch.cat([x_dim.narrow(dim, i * c, c) for i in ids], dim=dim)
        torch.testing.assert_close(local, expected, rtol=0, atol=0)
        torch.testing.assert_close(ringpatch.unshard(local, dim=dim, layout=layout), x_dim, rtol=0, atol=0)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_roundtrip(world):
    spawn(_check_roundtrip, world)
