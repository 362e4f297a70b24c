"""Which (query rows, key rows) blocks a ring step must compute, and with which mask.

Visibility (docs/design.md, "Visibility"): query at global position i sees key j iff
i - W < j (and j <= i when causal), and, when the sequence packs documents, i and j lie in
the same document. Each rank's local rows are a few contiguous global ranges (the layout's
chunks), so a ring step is a handful of chunk pairs. Each pair is:
  none    - hidden by the mask: skipped, never computed and masked;
  full    - every query sees every key: one unmasked kernel call;
  causal  - the diagonal block: the kernel's own causal mask (top-left aligned, equal sizes);
  partial - cut by a window edge: split into tiles, tiles classified again, and only the
            remaining edge tiles get an explicit mask ("band"), so a window costs O(S*W).
Rows of a band tile that would see no key are trimmed: flash kernels report lse = 0, not
-inf, for fully masked rows, which would corrupt the merge.
Documents cut every pair first into per-document rectangles (the queries and keys of one
document), each classified as above; a pair that shares no document is "none". So documents
need no padding: one may start or end anywhere, straddle ranks, or be one token long. Rectangles
that follow each other (queries and keys both adjacent, in storage and in position) and share a
kind are then packed into one call whose cuts mark where each document starts (a varlen call:
cumulative lengths, as flash-attention's varlen kernels take them), so a block of many short
documents is one kernel call; a kernel without varlen runs its segments one by one (`segments`).
Plans are pure functions of integers and are memoised.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from typing import Literal

Kind = Literal["full", "causal", "band"]


@dataclass(frozen=True)
class Call:
    """One kernel call: local query rows [q0, q1) against block key rows [k0, k1)."""

    q0: int
    q1: int
    k0: int
    k1: int
    kind: Kind
    q_pos: int  # global position of row q0 (band masks are built from positions)
    k_pos: int  # global position of key k0
    q_cuts: tuple[int, ...] = ()
    """A varlen call (several documents): offsets inside [q0, q1) where the next document's queries
    start; segment i is its queries i against its keys i (k_cuts), each under `kind`."""
    k_cuts: tuple[int, ...] = ()


def segments(call: Call) -> tuple[Call, ...]:
    """A varlen call as one plain call per document (itself when it is one already)."""
    if not call.q_cuts:
        return (call,)
    qs = (0, *call.q_cuts, call.q1 - call.q0)
    ks = (0, *call.k_cuts, call.k1 - call.k0)
    return tuple(
        Call(call.q0 + qa, call.q0 + qb, call.k0 + ka, call.k0 + kb, call.kind, call.q_pos + qa, call.k_pos + ka)
        for qa, qb, ka, kb in zip(qs[:-1], qs[1:], ks[:-1], ks[1:], strict=True)
    )


def pack_documents(calls: list[Call]) -> list[Call]:
    """Fuse each run of full (or of causal) calls that follow one another in queries and keys, in
    storage and in position, into one varlen call (documents side by side on the block's diagonal)."""
    packed: list[Call] = []
    for c in calls:
        p = packed[-1] if packed else None
        if (
            p is not None
            and c.kind == p.kind
            and c.kind in ("full", "causal")
            and (c.q0, c.k0) == (p.q1, p.k1)
            and (c.q_pos, c.k_pos) == (p.q_pos + p.q1 - p.q0, p.k_pos + p.k1 - p.k0)
        ):
            q_cuts = (*p.q_cuts, p.q1 - p.q0, *(p.q1 - p.q0 + x for x in c.q_cuts))
            k_cuts = (*p.k_cuts, p.k1 - p.k0, *(p.k1 - p.k0 + x for x in c.k_cuts))
            packed[-1] = Call(p.q0, c.q1, p.k0, c.k1, p.kind, p.q_pos, p.k_pos, q_cuts, k_cuts)
        else:
            packed.append(c)
    return packed


def classify(qa: int, m: int, kb: int, n: int, causal: bool, window: int | None) -> str:
    """Mask class of queries [qa, qa+m) against keys [kb, kb+n), in global positions."""
    q_last, k_last = qa + m - 1, kb + n - 1
    if (causal and kb > q_last) or (window is not None and k_last <= qa - window):
        return "none"
    if (not causal or k_last <= qa) and (window is None or kb > q_last - window):
        return "full"
    if causal and qa == kb and m == n and (window is None or m - 1 < window):
        return "causal"
    return "partial"


def _visible_span(i: int, kb: int, n: int, causal: bool, window: int | None) -> tuple[int, int]:
    lo = kb if window is None else max(kb, i - window + 1)
    hi = min(kb + n, i + 1) if causal else kb + n
    return lo, hi


def band_call(qa, m, kb, n, lq, lk, causal, window) -> Call | None:
    """A masked call for a partial tile, trimmed to the rows and keys that see something."""
    spans = [_visible_span(i, kb, n, causal, window) for i in range(qa, qa + m)]
    rows = [qa + r for r, (lo, hi) in enumerate(spans) if lo < hi]
    if not rows:
        return None
    first, last = rows[0], rows[-1]  # visible rows are contiguous: spans are monotone in i
    k_lo, k_hi = spans[first - qa][0], spans[last - qa][1]
    q0, k0 = lq + first - qa, lk + k_lo - kb
    return Call(q0, q0 + last - first + 1, k0, k0 + k_hi - k_lo, "band", first, k_lo)


def _pair_calls(qa, m, lq, kb, n, lk, causal, window, tile) -> list[Call]:
    kind = classify(qa, m, kb, n, causal, window)
    if kind == "none":
        return []
    if kind != "partial":
        return [Call(lq, lq + m, lk, lk + n, kind, qa, kb)]
    if tile is None or (m <= tile and n <= tile):
        call = band_call(qa, m, kb, n, lq, lk, causal, window)
        return [call] if call else []
    calls = []
    for dq in range(0, m, tile):
        for dk in range(0, n, tile):
            tm, tn = min(tile, m - dq), min(tile, n - dk)
            calls += _pair_calls(qa + dq, tm, lq + dq, kb + dk, tn, lk + dk, causal, window, None)
    return calls


def _merge_full(calls: list[Call]) -> list[Call]:
    """Fuse unmasked calls that are adjacent along keys, then along queries."""
    for along_k in (True, False):
        merged: list[Call] = []
        for c in calls:
            p = merged[-1] if merged else None
            if p and p.kind == c.kind == "full":
                if along_k and (p.q0, p.q1) == (c.q0, c.q1) and p.k1 == c.k0:
                    merged[-1] = Call(p.q0, p.q1, p.k0, c.k1, "full", p.q_pos, p.k_pos)
                    continue
                if not along_k and (p.k0, p.k1) == (c.k0, c.k1) and p.q1 == c.q0:
                    merged[-1] = Call(p.q0, c.q1, p.k0, p.k1, "full", p.q_pos, p.k_pos)
                    continue
            merged.append(c)
        calls = sorted(merged, key=lambda c: (c.k0, c.k1, c.q0)) if along_k else merged
    return calls


def _shared_documents(docs: tuple[int, ...], qa: int, m: int, kb: int, n: int):
    """For each document that holds some of queries [qa, qa+m) and some of keys [kb, kb+n):
    ((q_start, q_end), (k_start, k_end)), its queries and keys. `docs`: document starts."""
    stop = min(qa + m, kb + n)  # a document that starts here misses one of the ranges
    first = bisect.bisect_right(docs, min(qa, kb)) - 1
    for d in range(max(first, 0), len(docs)):
        start = docs[d]
        if start >= stop:
            return
        end = docs[d + 1] if d + 1 < len(docs) else max(qa + m, kb + n)
        q_span, k_span = (max(qa, start), min(qa + m, end)), (max(kb, start), min(kb + n, end))
        if q_span[0] < q_span[1] and k_span[0] < k_span[1]:
            yield q_span, k_span


def plan_block(
    q_ranges: tuple[tuple[int, int], ...],
    k_ranges: tuple[tuple[int, int], ...],
    causal: bool,
    window: int | None,
    tile: int | None,
    fuse_causal: bool = True,
    docs: tuple[int, ...] | None = None,
) -> tuple[Call, ...]:
    """The calls for local queries (chunks `q_ranges`) against one key block (`k_ranges`).

    Ranges are (global start, length) in local storage order. `tile=None` means the kernel
    honours arbitrary band masks natively, so partial pairs are not split. `fuse_causal`
    lets a rank's own block become one causal call when that is exact. `docs`: the global
    start positions of the packed documents (the first is 0), or None for one sequence.
    Plans without documents are memoised here; with documents (a new set every batch) the
    ring memoises a few whole plans instead, so no cache holds many boundary lists.
    """
    if docs is None:
        return _plan_sequence(q_ranges, k_ranges, causal, window, tile, fuse_causal)
    return _plan(q_ranges, k_ranges, causal, window, tile, fuse_causal, docs)


@functools.lru_cache(maxsize=4096)
def _plan_sequence(q_ranges, k_ranges, causal, window, tile, fuse_causal) -> tuple[Call, ...]:
    return _plan(q_ranges, k_ranges, causal, window, tile, fuse_causal, None)


def _plan(q_ranges, k_ranges, causal, window, tile, fuse_causal, docs) -> tuple[Call, ...]:
    if fuse_causal and docs is None and q_ranges == k_ranges and causal:
        span = q_ranges[-1][0] + q_ranges[-1][1] - q_ranges[0][0]
        if window is None or span - 1 < window:
            # Positions increase with local index, so local causal == global causal; the
            # kernel skips the hidden upper triangle itself.
            n = sum(length for _, length in q_ranges)
            return (Call(0, n, 0, n, "causal", q_ranges[0][0], k_ranges[0][0]),)
    calls: list[Call] = []
    lq = 0
    for qa, m in q_ranges:
        lk = 0
        for kb, n in k_ranges:
            if docs is None:
                calls += _pair_calls(qa, m, lq, kb, n, lk, causal, window, tile)
            else:
                for (q0, q1), (k0, k1) in _shared_documents(docs, qa, m, kb, n):
                    calls += _pair_calls(q0, q1 - q0, lq + q0 - qa, k0, k1 - k0, lk + k0 - kb, causal, window, tile)
            lk += n
        lq += m
    merged = _merge_full(calls)
    return tuple(merged if docs is None else pack_documents(merged))


def call_work(call: Call) -> float:
    """Relative cost of a call: query-key pairs computed (a varlen call's, over its documents)."""
    if call.q_cuts:
        return sum(call_work(s) for s in segments(call))
    pairs = (call.q1 - call.q0) * (call.k1 - call.k0)
    return pairs / 2 if call.kind == "causal" else pairs


def split_work(calls: tuple[Call, ...]) -> tuple[tuple[Call, ...], tuple[Call, ...]]:
    """Cut `calls` where the first part reaches half of the work (the first part is never empty);
    a varlen call is cut between its documents (each half packed again)."""
    varlen = any(c.q_cuts for c in calls)
    pieces = [s for c in calls for s in segments(c)] if varlen else list(calls)
    total, done = sum(map(call_work, pieces)), 0.0
    for i, piece in enumerate(pieces):
        done += call_work(piece)
        if done >= total / 2:
            first, second = pieces[: i + 1], pieces[i + 1 :]
            if varlen:
                first, second = pack_documents(first), pack_documents(second)
            return tuple(first), tuple(second)
    return calls, ()
