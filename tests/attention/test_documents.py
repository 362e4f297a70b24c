"""Ring attention over packed documents against a float64 block-diagonal reference, on real
gloo groups: no query ever sees another document's keys, whatever the layout and the ranks."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

import ringpatch
from ringpatch.attention.kernels import TorchCPU
from ringpatch.attention.kernels.base import backward_by_segment, forward_by_segment
from tests.helpers.procs import spawn
from tests.helpers.reference import attention, doc_ids_from_lengths, rel_err, rms_err, visible

pytestmark = pytest.mark.multiprocess

SEQ = 96  # P=4 zigzag: chunks of 12; P=3: 16; contiguous P=4: 24
FP32_REL = 1e-5
# Per row, document lengths: 1- and 2-token documents, documents longer than a chunk and
# straddling ranks, one document filling the row.
SPLITS = {
    "tiny-and-long": [[1, 2, 30, 1, 40, 22], [96]],
    "random": None,  # drawn per case
    "same-rows": [[7, 50, 39], [7, 50, 39]],
}


def _random_lengths(rng: random.Random, seq: int = SEQ) -> list[int]:
    lengths, left = [], seq
    while left:
        n = min(left, rng.choice([1, 2, rng.randint(3, 12), rng.randint(13, 60)]))
        lengths.append(n)
        left -= n
    return lengths


def _cu_seqlens(rows: list[list[int]]) -> list[int]:
    bounds = [0]
    for row in rows:
        for n in row:
            bounds.append(bounds[-1] + n)
    return bounds


def _inputs(seed, heads, kv_heads, batch=2, dim=16):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, SEQ, h, dim) for h in (heads, kv_heads, kv_heads, heads)]
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _reference(q, k, v, dout, causal, window, doc_ids):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = attention(q, k, v, causal, window, doc_ids=doc_ids)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _monolithic(q, k, v, dout, causal, window, doc_ids, dtype):
    """One-process fused attention with the block-diagonal mask (doc_ids None: one sequence per
    row): the bf16 bar."""
    mask = visible(q.shape[1], causal, window)[None]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])
    q, k, v = (x.to(dtype).transpose(1, 2).requires_grad_() for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
    out.backward(dout.to(dtype).transpose(1, 2))
    return [x.transpose(1, 2) for x in (out.detach(), q.grad, k.grad, v.grad)]


def _ring(q, k, v, dout, causal, window, layout, dtype, cu_seqlens, backend="auto"):
    q, k, v = (ringpatch.shard(x.to(dtype), layout=layout, cu_seqlens=cu_seqlens).requires_grad_() for x in (q, k, v))
    out = ringpatch.ring_attention(
        q, k, v, causal=causal, window=window, layout=layout, cu_seqlens=cu_seqlens, backend=backend
    )
    out.backward(ringpatch.shard(dout.to(dtype), layout=layout, cu_seqlens=cu_seqlens))
    return [ringpatch.unshard(x.detach(), layout=layout, cu_seqlens=cu_seqlens) for x in (out, q.grad, k.grad, v.grad)]


def _check_documents(rank, world, layout):
    names = ("out", "dq", "dk", "dv")
    rng = random.Random(f"{world}-{layout}")
    cases = itertools.product((True, False), (None, 5, 40), ((4, 2), (4, 1)), SPLITS)  # GQA, MQA
    for case_id, (causal, window, (h, hkv), split) in enumerate(cases):
        rows = SPLITS[split] or [_random_lengths(rng), _random_lengths(rng)]
        doc_ids, cu_seqlens = doc_ids_from_lengths(rows), _cu_seqlens(rows)
        q, k, v, dout = _inputs(case_id, h, hkv)
        ref = _reference(q, k, v, dout, causal, window, doc_ids)
        label = f"P={world} {layout} causal={causal} window={window} heads={h}/{hkv} docs={rows}"
        got = _ring(q, k, v, dout, causal, window, layout, torch.float32, torch.tensor(cu_seqlens))
        for name, a, want in zip(names, got, ref, strict=True):
            err = rel_err(a, want)
            assert err <= FP32_REL, f"{label} float32 {name}: relative error {err:.2e} > {FP32_REL}"
        ring16 = _ring(q, k, v, dout, causal, window, layout, torch.bfloat16, cu_seqlens)
        mono16 = _monolithic(q, k, v, dout, causal, window, doc_ids, torch.bfloat16)
        for name, a, mono, want in zip(names, ring16, mono16, ref, strict=True):
            assert rms_err(a, want) <= rms_err(mono, want), (
                f"{label} bfloat16 {name}: ring rms error {rms_err(a, want):.3e} "
                f"> monolithic bfloat16 {rms_err(mono, want):.3e}"
            )


@pytest.mark.parametrize("layout", ["zigzag", "contiguous", "balanced"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_documents_match_block_diagonal_attention(world, layout):
    spawn(_check_documents, world, layout)


class VarlenCPU(TorchCPU):
    """The CPU kernel taking varlen calls (a block's documents in one call), each computed one
    document at a time: what the ring does with a varlen kernel's results is checked here, the
    CUDA varlen calls themselves by gpu-check. Counts the varlen calls it gets."""

    varlen = True

    def __init__(self):
        self.varlen_calls = 0

    def forward(self, q, k, v, call, spec):
        if not call.q_cuts:
            return super().forward(q, k, v, call, spec)
        self.varlen_calls += 1
        return forward_by_segment(super().forward, q, k, v, call, spec)

    def backward(self, dout, q, k, v, out, lse, call, spec):
        if not call.q_cuts:
            return super().backward(dout, q, k, v, out, lse, call, spec)
        return backward_by_segment(super().backward, dout, q, k, v, out, lse, call, spec)


def _check_varlen_documents(rank, world, layout):
    names = ("out", "dq", "dk", "dv")
    rng = random.Random(f"varlen-{world}-{layout}")
    kernel = VarlenCPU()
    for case_id, (causal, window) in enumerate([(True, None), (False, None), (True, 40)]):
        rows = [_random_lengths(rng), [7, 50, 39]]
        q, k, v, dout = _inputs(case_id, 4, 2)
        ref = _reference(q, k, v, dout, causal, window, doc_ids_from_lengths(rows))
        got = _ring(q, k, v, dout, causal, window, layout, torch.float32, torch.tensor(_cu_seqlens(rows)), kernel)
        for name, a, want in zip(names, got, ref, strict=True):
            err = rel_err(a, want)
            assert err <= FP32_REL, f"P={world} {layout} causal={causal} docs={rows} {name}: relative error {err:.2e}"
    assert kernel.varlen_calls > 0, "no varlen call reached the kernel: the test checked nothing of them"


@pytest.mark.parametrize("layout", ["contiguous", "balanced"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_varlen_calls_match_block_diagonal_attention(world, layout):
    spawn(_check_varlen_documents, world, layout)


def _check_one_document_is_plain_causal(rank, world):
    q, k, v, _ = _inputs(0, 4, 2)
    local = [ringpatch.shard(x.float()) for x in (q, k, v)]
    plain = ringpatch.ring_attention(*local, window=5)
    whole = ringpatch.ring_attention(*local, window=5, cu_seqlens=[0, SEQ, 2 * SEQ])
    torch.testing.assert_close(whole, plain, rtol=0, atol=0)


def test_one_document_per_row_equals_plain_causal():
    spawn(_check_one_document_is_plain_causal, 2)
