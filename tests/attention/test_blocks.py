"""The ring's plans: every visible (query, key) pair computed exactly once, hidden blocks
skipped, equal causal work per rank under zigzag, and windows cut the ring short."""

from __future__ import annotations

import itertools

import pytest

from ringpatch.attention.blocks import call_work
from ringpatch.attention.layout import local_positions
from ringpatch.attention.ring import ring_plans

pytestmark = pytest.mark.unit


def _pairs(layout, seq, world, causal, window, tile, rank):
    """The (i, j) global pairs that rank's calls attend, counting each time it is attended."""
    pos = [local_positions(layout, seq, world, r).tolist() for r in range(world)]
    seen: dict[tuple[int, int], int] = {}
    for step, calls in enumerate(ring_plans(layout, seq, world, causal, window, tile)[rank]):
        keys = pos[(rank - step) % world]
        for c in calls:
            for a, b in itertools.product(range(c.q0, c.q1), range(c.k0, c.k1)):
                i, j = pos[rank][a], keys[b]
                if c.kind == "causal" and b - c.k0 > a - c.q0:
                    continue  # the kernel's own causal mask
                if c.kind == "band" and ((causal and j > i) or (window is not None and j <= i - window)):
                    continue  # masked inside the band tile
                seen[(i, j)] = seen.get((i, j), 0) + 1
    return pos[rank], seen


def _visible(i, j, causal, window):
    return (not causal or j <= i) and (window is None or j > i - window)


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
