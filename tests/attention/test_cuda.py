"""On a CUDA device: ring_attention's CUDA kernels (one rank: the local blocks, merges and
window tiles) against float64, no worse than monolithic bfloat16 attention. Skipped without CUDA;
`make gpu-check` covers the kernels block by block and the throughput."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ringpatch
from tests.helpers.reference import attention, rms_err, visible

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dim", [64, 36])  # 36: padded to 40 for the fused kernels
@pytest.mark.parametrize("window", [None, 300])
@pytest.mark.parametrize("heads, kv_heads", [(8, 8), (8, 2)])
def test_cuda_ring_of_one_matches_float64(window, heads, kv_heads, dim):
    g = torch.Generator().manual_seed(0)
    seq = 2048
    q, k, v, dout = (
        torch.randn(1, seq, h, dim, generator=g, dtype=torch.float64) for h in (heads, kv_heads, kv_heads, heads)
    )
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out = attention(*ref, causal=True, window=window)
    ref_out.backward(dout)
    want = [ref_out.detach(), *(x.grad for x in ref)]

    def run(fn):
        xs = [x.to("cuda", torch.bfloat16).requires_grad_() for x in (q, k, v)]
        out = fn(*xs)
        out.backward(dout.to("cuda", torch.bfloat16))
        return [t.detach().cpu() for t in (out, *(x.grad for x in xs))]

    def mono(q, k, v):
        mask = visible(seq, True, window).cuda() if window else None
        t = [x.transpose(1, 2) for x in (q, k, v)]
        out = F.scaled_dot_product_attention(*t, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return out.transpose(1, 2)

    got = run(lambda q, k, v: ringpatch.ring_attention(q, k, v, window=window, backend="torch"))
    bar = run(mono)
    for name, a, m, w in zip(("out", "dq", "dk", "dv"), got, bar, want, strict=True):
        assert rms_err(a, w) <= rms_err(m, w), f"{name}: ring {rms_err(a, w):.3e} > monolithic {rms_err(m, w):.3e}"


def test_cuda_float64_is_refused_with_the_fix():
    q = torch.randn(1, 64, 4, 32, device="cuda", dtype=torch.float64)
    with pytest.raises(ValueError, match=r"the CUDA kernels take float16, bfloat16 or float32, got torch.float64"):
        ringpatch.ring_attention(q, q, q, backend="torch")
