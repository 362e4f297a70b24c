"""The flash-attn backend's translation of ring calls into flash-attn's arguments, without a GPU.

flash-attn aligns its causal mask and its windows to the bottom-right corner: query row i of m
sees keys [i + n - m - left, i + n - m + right] of n (its README). A stand-in module computes
exactly that rule in float64; FlashAttn's forward and backward through it must equal the CPU
kernel's on every kind of call the ring makes (full, causal, band with and without a window,
GQA, m != n). What it cannot check: flash-attn's own numerics, which need CUDA."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from ringpatch.attention.blocks import Call
from ringpatch.attention.kernels.base import MaskSpec
from ringpatch.attention.kernels.flash_attn2 import FlashAttn
from ringpatch.attention.kernels.torch_cpu import TorchCPU

pytestmark = pytest.mark.unit


def _reference(q, k, v, softmax_scale, causal, window_size_left, window_size_right):
    """(out (B,m,H,D), lse (B,H,m)) under flash-attn's bottom-right rule, float64."""
    m, n, rep = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
    k, v = (x.double().repeat_interleave(rep, dim=2) for x in (k, v))
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k) * softmax_scale
    i = torch.arange(m)[:, None] + (n - m)
    j = torch.arange(n)[None, :]
    right = 0 if causal else window_size_right
    visible = torch.ones(m, n, dtype=torch.bool)
    if window_size_left >= 0:
        visible &= j >= i - window_size_left
    if right >= 0:
        visible &= j <= i + right
    scores = scores.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, dim=-1), v)
    return out, lse


@pytest.fixture
def fake_flash_attn(monkeypatch):
    seen = []

    def forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                alibi_slopes, return_softmax):  # fmt: skip
        assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None and not return_softmax
        seen.append((causal, window_size_left, window_size_right))
        out, lse = _reference(q, k, v, softmax_scale, causal, window_size_left, window_size_right)
        return out.to(q.dtype), lse.float(), None, None

    def backward(dout, q, k, v, out, lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size_left,
                 window_size_right, softcap, alibi_slopes, deterministic):  # fmt: skip
        assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None
        seen.append((causal, window_size_left, window_size_right))
        q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
        ref, _ = _reference(q64, k64, v64, softmax_scale, causal, window_size_left, window_size_right)
        grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
        for target, grad in zip((dq, dk, dv), grads, strict=True):
            target.copy_(grad)

    interface = types.ModuleType("flash_attn.flash_attn_interface")
    interface._flash_attn_forward, interface._flash_attn_backward = forward, backward
    package = types.ModuleType("flash_attn")
    package.flash_attn_interface, package.__version__ = interface, "2.7.0"
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", interface)
    return seen


CASES = [  # (m, n, call kind, q_pos, k_pos, causal, window)
    (8, 8, "full", 16, 0, True, None),
    (8, 8, "causal", 8, 8, True, None),
    (8, 8, "band", 4, 0, True, None),  # a causal edge off the diagonal
    (6, 10, "band", 12, 4, True, None),  # m != n
    (8, 8, "band", 8, 4, True, 6),  # a window's edge
    (8, 12, "band", 10, 2, True, 7),
    (8, 8, "band", 4, 4, False, 3),  # a two-sided window, not causal
    (8, 8, "full", 0, 0, False, None),
]


@pytest.mark.parametrize("m,n,kind,q_pos,k_pos,causal,window", CASES)
def test_flash_attn_calls_equal_the_cpu_kernel(fake_flash_attn, m, n, kind, q_pos, k_pos, causal, window):
    torch.manual_seed(0)
    q = torch.randn(2, m, 4, 16)
    k, v = torch.randn(2, n, 2, 16), torch.randn(2, n, 2, 16)  # GQA 4:2
    call = Call(0, m, 0, n, kind, q_pos, k_pos)
    spec = MaskSpec(causal=causal, window=window, scale=16**-0.5)
    flash, cpu = FlashAttn(), TorchCPU()
    out, lse = flash.forward(q, k, v, call, spec)
    ref_out, ref_lse = cpu.forward(q, k, v, call, spec)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.float(), ref_lse.float(), rtol=1e-5, atol=1e-5)
    dout = torch.randn_like(q)
    grads = flash.backward(dout, q, k, v, out, lse, call, spec)
    ref_grads = cpu.backward(dout, q, k, v, ref_out, ref_lse, call, spec)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=1e-5)
    assert len(fake_flash_attn) == 2 and fake_flash_attn[0] == fake_flash_attn[1]  # one call each, one mask
