"""The ring's plans: every visible (query, key) pair computed exactly once, hidden blocks
skipped, equal causal work per rank under zigzag, windows cut the ring short, and with packed
documents no call ever spans two documents."""

from __future__ import annotations

import bisect
import itertools
import math
import random

import pytest

from ringpatch.attention.blocks import call_work, segments
from ringpatch.attention.layout import local_positions
from ringpatch.attention.ring import ring_plans

pytestmark = pytest.mark.unit


def _doc(docs, i):
    return 0 if docs is None else bisect.bisect_right(docs, i) - 1


def _pairs(layout, seq, world, causal, window, tile, rank, docs=None):
    """The (i, j) global pairs that rank's calls attend, counting each time it is attended."""
    pos = [local_positions(layout, seq, world, r, docs=docs).tolist() for r in range(world)]
    seen: dict[tuple[int, int], int] = {}
    for step, calls in enumerate(ring_plans(layout, seq, world, causal, window, tile, docs)[rank]):
        keys = pos[(rank - step) % world]
        for c in (piece for call in calls for piece in segments(call)):  # a varlen call: each document's part
            for a, b in itertools.product(range(c.q0, c.q1), range(c.k0, c.k1)):
                i, j = pos[rank][a], keys[b]
                # a segment never spans two documents: nothing across a boundary is computed, even masked
                assert _doc(docs, i) == _doc(docs, j), f"rank {rank} step {step}: {c} spans documents ({i}, {j})"
                if c.kind == "causal" and b - c.k0 > a - c.q0:
                    continue  # the kernel's own causal mask
                if c.kind == "band" and ((causal and j > i) or (window is not None and j <= i - window)):
                    continue  # masked inside the band tile
                seen[(i, j)] = seen.get((i, j), 0) + 1
    return pos[rank], seen


def _visible(i, j, causal, window, docs=None):
    return (not causal or j <= i) and (window is None or j > i - window) and _doc(docs, i) == _doc(docs, j)


def _random_docs(seq, rng):
    """Document starts: 1- and 2-token documents, ones longer than a chunk, anywhere."""
    starts, pos = [0], 0
    while True:
        pos += rng.choice([1, 2, 3, rng.randint(4, 12), rng.randint(13, seq)])
        if pos >= seq:
            return tuple(starts)
        starts.append(pos)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("causal, window", [(True, None), (False, None), (True, 3), (True, 13), (False, 5)])
def test_every_visible_pair_exactly_once(layout, world, causal, window):
    seq = 48
    for rank in range(world):
        rows, seen = _pairs(layout, seq, world, causal, window, 4, rank)
        want = {(i, j) for i in rows for j in range(seq) if _visible(i, j, causal, window)}
        assert set(seen) == want, (
            f"rank {rank}: missing {sorted(want - set(seen))[:5]}, extra {sorted(set(seen) - want)[:5]}"
        )
        assert max(seen.values()) == 1, f"rank {rank}: pairs attended twice"


@pytest.mark.parametrize("layout", ["zigzag", "contiguous", "balanced"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("causal, window", [(True, None), (False, None), (True, 3), (True, 13)])
def test_documents_every_visible_pair_exactly_once_and_none_across(layout, world, causal, window):
    seq, rng = 96, random.Random(f"{layout}{world}{causal}{window}")
    for docs in [_random_docs(seq, rng) for _ in range(4)] + [(0, 1, 2, 95), tuple(range(0, seq, 7))]:
        for rank in range(world):
            rows, seen = _pairs(layout, seq, world, causal, window, 4, rank, docs)
            want = {(i, j) for i in rows for j in range(seq) if _visible(i, j, causal, window, docs)}
            assert set(seen) == want, (
                f"docs {docs} rank {rank}: missing {sorted(want - set(seen))[:5]}, extra {sorted(set(seen) - want)[:5]}"
            )
            assert max(seen.values()) == 1, f"docs {docs} rank {rank}: pairs attended twice"


def test_documents_shorter_than_a_chunk_cut_the_ring():
    """Documents that fit inside a chunk need no remote keys: the ring stops after step 0."""
    plans = ring_plans("contiguous", 64, 4, True, None, None, tuple(range(0, 64, 8)))
    assert all(len(p) == 1 for p in plans)


def _lognormal_docs(seq, mean, sigma, rng):
    mu, starts = math.log(mean) - sigma**2 / 2, [0]
    while (nxt := starts[-1] + max(1, int(rng.lognormvariate(mu, sigma)))) < seq:
        starts.append(nxt)
    return tuple(starts)


def _imbalance(layout, seq, world, docs):
    plans = ring_plans(layout, seq, world, True, None, None, docs)
    work = [sum(call_work(c) for calls in plans[r] for c in calls) for r in range(world)]
    return max(work) * world / sum(work)


@pytest.mark.parametrize("world", [2, 4])
def test_balanced_layout_evens_out_document_work(world):
    """Lognormal document lengths (mean S/16 and S/8): the worst rank's attended pairs stay within
    1.10x the mean under the balanced layout, where zigzag leaves them far apart."""
    seq, worst = 4096, {"zigzag": 0.0, "balanced": 0.0}
    for seed, (mean, sigma) in itertools.product(range(5), [(seq / 16, 0.5), (seq / 16, 1.0), (seq / 8, 1.0)]):
        docs = _lognormal_docs(seq, mean, sigma, random.Random(seed))
        for layout in worst:
            worst[layout] = max(worst[layout], _imbalance(layout, seq, world, docs))
    assert worst["balanced"] <= 1.10, worst
    assert worst["zigzag"] > 1.25, worst  # the imbalance the balanced layout removes


def test_balanced_without_documents_is_zigzag():
    for world in (1, 2, 3):
        for r in range(world):
            assert (
                local_positions("balanced", 96, world, r).tolist() == local_positions("zigzag", 96, world, r).tolist()
            )


def test_zigzag_balances_causal_work_every_step():
    plans = ring_plans("zigzag", 64, 4, True, None, None)
    for step in range(4):
        work = {sum(call_work(c) for c in plans[r][step]) for r in range(4)}
        assert len(work) == 1, f"step {step}: per-rank work {work}"
    contiguous = ring_plans("contiguous", 64, 4, True, None, None)
    assert len({sum(call_work(c) for c in contiguous[r][1]) for r in range(4)}) > 1  # the imbalance zigzag removes


def test_window_cuts_the_ring_and_the_work():
    # contiguous chunks of 16, window 4: only the previous rank's block is ever needed
    plans = ring_plans("contiguous", 64, 4, True, 4, 4)
    assert all(len(p) == 2 for p in plans)
    band = sum(call_work(c) for p in plans for calls in p for c in calls)
    full_causal = sum(
        call_work(c) for p in ring_plans("contiguous", 64, 4, True, None, 4) for calls in p for c in calls
    )
    assert band < 0.3 * full_causal, (band, full_causal)


@pytest.mark.parametrize("layout", ["balanced", "zigzag", "contiguous"])
def test_packed_documents_cost_about_the_calls_of_one_document(layout):
    """A ProLong-like 1M-token row of about 384 documents (lognormal lengths) over 8 ranks: per rank
    and head group, the ring's forward makes at most twice the calls of one 1M-token document, where
    one call per document made 8-11 times as many. (A GPU kernel takes each varlen call whole; the
    CPU kernel takes its documents one by one, as before.)"""
    seq, world = 2**20, 8
    docs = _lognormal_docs(seq, seq / 384, 1.0, random.Random(0))
    one = max(sum(len(calls) for calls in plan) for plan in ring_plans(layout, seq, world, True, None, None))
    plans = ring_plans(layout, seq, world, True, None, None, docs)
    packed = max(sum(len(calls) for calls in plan) for plan in plans)
    per_document = max(sum(len(segments(c)) for calls in plan for c in calls) for plan in plans)
    print(f"{layout}: {len(docs)} documents, calls per rank and head group in a forward: one document {one}, "
          f"one call per document {per_document}, packed {packed}")  # fmt: skip
    assert packed <= 2 * one < per_document / 3
