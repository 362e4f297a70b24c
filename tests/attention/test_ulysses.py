"""Ulysses x ring against a full-sequence float64 reference, on real gloo groups: heads traded
for sequence inside each Ulysses group, the ring across them, with GQA/MQA, windows, packed
documents and every layout."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.distributed as dist

import ringpatch
from ringpatch.attention.layout import local_ranges
from tests.attention.test_documents import _monolithic, _random_lengths, _reference
from tests.helpers.procs import spawn
from tests.helpers.reference import doc_ids_from_lengths, rel_err, rms_err

pytestmark = pytest.mark.multiprocess

FP32_REL = 1e-5
HEADS = ((8, 2), (8, 1), (4, 4))  # GQA 8:2, MQA (K/V repeated U times), MHA
NAMES = ("out", "dq", "dk", "dv")


def _seq(world: int) -> int:
    return 96 if world in (4, 6) else 128  # cut by 8 * world (balanced) for 4, 6 and 8 ranks


def _inputs(seed, batch, heads, kv_heads, seq, dim=16):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, seq, h, dim) for h in (heads, kv_heads, kv_heads, heads)]
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _hybrid(q, k, v, dout, causal, window, layout, dtype, cu, group):
    def cut(x):
        return ringpatch.shard(x.to(dtype), group=group, layout=layout, cu_seqlens=cu)

    q, k, v = (cut(x).requires_grad_() for x in (q, k, v))
    out = ringpatch.ring_attention(q, k, v, group=group, causal=causal, window=window, layout=layout, cu_seqlens=cu)
    out.backward(cut(dout))
    return [
        ringpatch.unshard(x.detach(), group=group, layout=layout, cu_seqlens=cu) for x in (out, q.grad, k.grad, v.grad)
    ]


def _check_parity(rank, world, ulysses, layout, docs):
    group = ringpatch.ulysses_ring_group(ulysses)
    assert (group.ulysses, group.ring) == (ulysses, world // ulysses)
    seq = _seq(world)
    rng = random.Random(f"{world}-{ulysses}-{layout}")
    cases = itertools.product((True, False) if world == 4 else (True,), (None, 5, 40), HEADS)  # non-causal: P=4
    for case_id, (causal, window, (h, hkv)) in enumerate(cases):
        if h % ulysses:
            continue
        batch = 2 if docs else 1 + case_id % 2
        rows = [_random_lengths(rng, seq) for _ in range(batch)] if docs else None
        doc_ids = doc_ids_from_lengths(rows) if docs else None
        cu = [0] + list(itertools.accumulate(n for row in rows for n in row)) if docs else None
        q, k, v, dout = _inputs(case_id, batch, h, hkv, seq)
        ref = _reference(q, k, v, dout, causal, window, doc_ids)
        label = f"P={world} U={ulysses} {layout} causal={causal} window={window} heads={h}/{hkv} docs={rows}"
        got = _hybrid(q, k, v, dout, causal, window, layout, torch.float32, cu, group)
        for name, a, want in zip(NAMES, got, ref, strict=True):
            assert a.dtype == torch.float32
            err = rel_err(a, want)
            assert err <= FP32_REL, f"{label} float32 {name}: relative error {err:.2e} > {FP32_REL}"
        ring16 = _hybrid(q, k, v, dout, causal, window, layout, torch.bfloat16, cu, group)
        mono16 = _monolithic(q, k, v, dout, causal, window, doc_ids, torch.bfloat16)
        for name, a, mono, want in zip(NAMES, ring16, mono16, ref, strict=True):
            assert a.dtype == torch.bfloat16
            assert rms_err(a, want) <= rms_err(mono, want), (
                f"{label} bfloat16 {name}: rms error {rms_err(a, want):.3e} > monolithic {rms_err(mono, want):.3e}"
            )


@pytest.mark.parametrize(
    "world, ulysses, layout, docs",
    [
        (4, 2, "zigzag", False),
        (4, 2, "contiguous", False),
        (4, 2, "zigzag", True),
        (4, 2, "balanced", True),
        (4, 4, "zigzag", False),
        (4, 4, "contiguous", True),
        (6, 2, "zigzag", True),
        (8, 2, "balanced", True),
    ],
)
def test_ulysses_ring_matches_full_attention(world, ulysses, layout, docs):
    spawn(_check_parity, world, ulysses, layout, docs)


def test_the_layout_cuts_each_ring_part_into_ulysses_pieces():
    """Rank (r, u) holds piece u of ring rank r's positions (in the ring's local order), so the
    all-to-all's concatenation in u order is ring rank r's part."""
    for layout, seq, n, u in itertools.product(("zigzag", "contiguous", "balanced"), (96, 192), (4, 6, 8), (1, 2, 4)):
        if n % u or seq % (8 * n):
            continue
        docs = (0, 5, 40, 41) if layout == "balanced" else None
        every = []
        for r in range(n // u):
            ring_part = [p for s, m in local_ranges(layout, seq, n // u, r, docs) for p in range(s, s + m)]
            pieces = [
                [p for s, m in local_ranges(layout, seq, n, r * u + j, docs, ulysses=u) for p in range(s, s + m)]
                for j in range(u)
            ]
            assert [p for piece in pieces for p in piece] == ring_part
            assert all(len(piece) == seq // n for piece in pieces)
            every += ring_part
        assert sorted(every) == list(range(seq))


def _check_groups_of_replicas(rank, world):
    """dp=2 x sp=4 with U=2: each replica's sequence group splits on its own ranks."""
    replicas = [dist.new_group([0, 1, 2, 3]), dist.new_group([4, 5, 6, 7])]
    mine = replicas[rank // 4]
    group = ringpatch.ulysses_ring_group(2, group=mine)
    base = rank - rank % 4
    assert dist.get_process_group_ranks(group.ulysses_group) == [
        base + (rank % 4) // 2 * 2,
        base + (rank % 4) // 2 * 2 + 1,
    ]
    assert dist.get_process_group_ranks(group.ring_group) == [base + rank % 2, base + rank % 2 + 2]
    q, k, v, dout = _inputs(rank // 4, 1, 8, 2, 64)
    ref = _reference(q, k, v, dout, True, None, None)
    got = _hybrid(q, k, v, dout, True, None, "zigzag", torch.float32, None, group)
    for name, a, want in zip(NAMES, got, ref, strict=True):
        assert rel_err(a, want) <= FP32_REL, f"replica {rank // 4} {name}: {rel_err(a, want):.2e}"


def test_each_data_parallel_replica_gets_its_own_groups():
    spawn(_check_groups_of_replicas, 8)
