"""The flash-attn backend's translation of ring calls into flash-attn's arguments, without a GPU.

flash-attn aligns its causal mask and its windows to the bottom-right corner: query row i of m
sees keys [i + n - m - left, i + n - m + right] of n (its README). A stand-in module computes
exactly that rule in float64; FlashAttn's forward and backward through it must equal the CPU
kernel's on every kind of call the ring makes (full, causal, band with and without a window,
GQA, m != n, and varlen calls: a block's documents in one call of the varlen kernels, each
document its own sequence of the packed rows). What it cannot check: flash-attn's own
numerics, which need CUDA."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from ringpatch.attention.blocks import Call
from ringpatch.attention.kernels.base import MaskSpec, backward_by_segment, forward_by_segment
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

    def _sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        """(queries, keys) slices of each packed sequence, checked against the longest given."""
        cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and len(cu_q) == len(cu_k)
        assert max_seqlen_q == max(b - a for a, b in zip(cu_q, cu_q[1:], strict=False))
        assert max_seqlen_k == max(b - a for a, b in zip(cu_k, cu_k[1:], strict=False))
        return [(slice(a, b), slice(c, d)) for a, b, c, d in zip(cu_q, cu_q[1:], cu_k, cu_k[1:], strict=False)]

    def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                       causal, window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
                       return_softmax=False):  # fmt: skip
        assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None and not return_softmax
        assert q.dim() == k.dim() == 3  # (total, heads, dim)
        seen.append(("varlen", causal, window_size_left, window_size_right))
        out, lse = torch.empty_like(q), torch.empty(q.shape[1], q.shape[0])  # lse: (heads, total_q)
        for qs, ks in _sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
            o, s = _reference(q[None, qs], k[None, ks], v[None, ks], softmax_scale, causal, window_size_left,
                              window_size_right)  # fmt: skip
            out[qs], lse[:, qs] = o[0].to(q.dtype), s[0].float()
        return out, lse, None, None

    def varlen_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap, alibi_slopes,
                        deterministic, rng_state=None):  # fmt: skip
        assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None
        assert lse.shape == (q.shape[1], q.shape[0])
        seen.append(("varlen", causal, window_size_left, window_size_right))
        for qs, ks in _sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
            q64, k64, v64 = (x[None, s].detach().double().requires_grad_() for x, s in ((q, qs), (k, ks), (v, ks)))
            ref, _ = _reference(q64, k64, v64, softmax_scale, causal, window_size_left, window_size_right)
            grads = torch.autograd.grad(ref, (q64, k64, v64), dout[None, qs].double())
            dq[qs], dk[ks], dv[ks] = (g[0] for g in grads)

    interface = types.ModuleType("flash_attn.flash_attn_interface")
    interface._flash_attn_forward, interface._flash_attn_backward = forward, backward
    interface._flash_attn_varlen_forward, interface._flash_attn_varlen_backward = varlen_forward, varlen_backward
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


VARLEN = [  # calls pack_documents makes: documents side by side on a block's diagonal, or earlier keys
    Call(0, 16, 0, 16, "causal", 0, 0, (3, 4, 11), (3, 4, 11)),
    Call(0, 16, 0, 12, "full", 40, 20, (5,), (7,)),
    Call(4, 14, 2, 12, "full", 40, 20, (1, 6), (3, 4)),  # not at the start of the local tensors
]


@pytest.mark.parametrize("call", VARLEN)
def test_a_varlen_call_is_one_varlen_flash_call_equal_to_the_cpu_kernel(fake_flash_attn, call):
    """The documents of a varlen call go to _flash_attn_varlen_forward/_backward once (two batch
    rows packed: the cumulative lengths cover both), and equal the CPU kernel run one document at
    a time (as the ring hands a kernel without varlen)."""
    torch.manual_seed(0)
    m, n = call.q1 - call.q0, call.k1 - call.k0
    q = torch.randn(2, m, 4, 16)
    k, v = torch.randn(2, n, 2, 16), torch.randn(2, n, 2, 16)
    spec = MaskSpec(causal=True, window=None, scale=16**-0.5)
    flash, cpu = FlashAttn(), TorchCPU()
    out, lse = flash.forward(q, k, v, call, spec)
    ref_out, ref_lse = forward_by_segment(cpu.forward, q, k, v, call, spec)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.float(), ref_lse.float(), rtol=1e-5, atol=1e-5)
    dout = torch.randn_like(q)
    grads = flash.backward(dout, q, k, v, out, lse, call, spec)
    ref_grads = backward_by_segment(cpu.backward, dout, q, k, v, ref_out, ref_lse, call, spec)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=1e-5)
    assert [s[0] for s in fake_flash_attn] == ["varlen", "varlen"]
