"""RingAttention: exact attention over a sequence split across the ranks of a group.

Forward: at step s rank r computes its queries against the K/V block that started on rank
(r - s) mod P, while the next block is already in flight. Blocks merge through their
log-sum-exp in float32. Backward: dQ accumulates locally; float32 dK/dV accumulators travel
the ring with their block and are sent home at the end. The ring stops at the last step any
rank needs (a sliding window needs only a few), and only the blocks the plan lists are
computed (Liu et al. 2023, "Ring Attention with Blockwise Transformers"; zigzag balancing
as in zhuzilin/ring-flash-attention). The merge is in merge.py, the layouts in layout.py, the
block plans in blocks.py; docs/design.md walks through the whole ring.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ringpatch.attention.blocks import Call, plan_block, segments, split_work
from ringpatch.attention.comm import Exchange
from ringpatch.attention.kernels import Kernel, MaskSpec
from ringpatch.attention.layout import Layout, local_ranges
from ringpatch.attention.merge import merge_
from ringpatch.errors import BadValue
from ringpatch.regions import Region, region, within


@dataclass(frozen=True)
class RingSpec:
    """Everything the ring needs besides tensors; per-call, never global."""

    causal: bool
    window: int | None
    scale: float
    layout: Layout
    seq_len: int  # global
    sp_size: int
    sp_rank: int
    kernel: Kernel
    docs: tuple[tuple[int, ...] | None, ...] | None = None
    """Per batch row, the global start positions of its packed documents (None: one sequence)."""

    @property
    def mask(self) -> MaskSpec:
        return MaskSpec(self.causal, self.window, self.scale)

    @property
    def tile(self) -> int | None:
        """Tile for window edges: about W/4 keeps the masked waste near 1/8 of the band."""
        if self.kernel.tile is None or self.window is None:
            return self.kernel.tile
        return min(self.kernel.tile, max(16, self.window // 4))

    def row_groups(self) -> list[tuple[slice, tuple[int, ...] | None]]:
        """Runs of neighbouring batch rows that pack the same documents, as (rows, docs)."""
        if self.docs is None:
            return [(slice(None), None)]
        groups, start = [], 0
        for b in range(1, len(self.docs) + 1):
            if b == len(self.docs) or self.docs[b] != self.docs[start]:
                groups.append((slice(start, b), self.docs[start]))
                start = b
        return groups

    def _calls(self, calls: tuple[Call, ...]) -> tuple[Call, ...]:
        """`calls` as this kernel takes them: a kernel without varlen gets each document's call alone."""
        if getattr(self.kernel, "varlen", False):
            return calls
        return tuple(s for c in calls for s in segments(c))

    def steps(self) -> tuple[tuple[tuple[slice, Call], ...], ...]:
        """(rows, call) pairs for steps 0..last, where last is the last step that any rank needs."""
        plans = [
            (rows, ring_plans(self.layout, self.seq_len, self.sp_size, self.causal, self.window, self.tile, docs))
            for rows, docs in self.row_groups()
        ]
        n_steps = max(len(p[self.sp_rank]) for _, p in plans)
        return tuple(
            tuple(
                (rows, c)
                for rows, p in plans
                if step < len(p[self.sp_rank])
                for c in self._calls(p[self.sp_rank][step])
            )
            for step in range(n_steps)
        )

    def own_block_halves(self) -> tuple[tuple[tuple[slice, Call], ...], tuple[tuple[slice, Call], ...]]:
        """The rank's own block, unfused and cut in two halves of work: the first hides the
        arrival of the first remote block, the second hides the last dK/dV going home."""
        first, second = [], []
        for rows, docs in self.row_groups():
            ranges = local_ranges(self.layout, self.seq_len, self.sp_size, self.sp_rank, docs)
            calls = plan_block(ranges, ranges, self.causal, self.window, self.tile, fuse_causal=False, docs=docs)
            a, b = split_work(calls)
            first += [(rows, c) for c in self._calls(a)]
            second += [(rows, c) for c in self._calls(b)]
        return tuple(first), tuple(second)


def ring_plans(layout, seq_len, sp_size, causal, window, tile, docs=None) -> tuple[tuple[tuple[Call, ...], ...], ...]:
    """plans[r][s]: the calls of rank r at step s, cut to the last step any rank needs.
    Memoised: every layer of a step asks for the same plans; documents change with each batch,
    so few of their plans are kept."""
    cached = _sequence_plans if docs is None else _document_plans
    return cached(layout, seq_len, sp_size, causal, window, tile, docs)


def _plan_ring(layout, seq_len, sp_size, causal, window, tile, docs) -> tuple[tuple[tuple[Call, ...], ...], ...]:
    ranges = [local_ranges(layout, seq_len, sp_size, r, docs) for r in range(sp_size)]
    plans = [
        [plan_block(ranges[r], ranges[(r - s) % sp_size], causal, window, tile, docs=docs) for s in range(sp_size)]
        for r in range(sp_size)
    ]
    last = max(s for r in range(sp_size) for s in range(sp_size) if plans[r][s] or s == 0)
    return tuple(tuple(p[: last + 1]) for p in plans)


_sequence_plans = functools.lru_cache(maxsize=256)(_plan_ring)
_document_plans = functools.lru_cache(maxsize=32)(_plan_ring)  # a micro-batch's rows, several layers


def _neighbours(spec: RingSpec, shift: int = 1) -> tuple[int, int]:
    """(dst, src) for passing a block `shift` ranks forward along the ring."""
    return (spec.sp_rank + shift) % spec.sp_size, (spec.sp_rank - shift) % spec.sp_size


GROUP_BYTES = 256 * 2**20
"""The most bytes that one head group's float32 accumulator (output or dQ) may take. The ring runs
once per group of K/V heads (with their query heads), so its float32 accumulators, K/V buffers,
dK/dV accumulators and each kernel call's outputs and scratch hold 1/G of the heads: at
Llama-3-8B's shape (32/8 heads of 128) and 131,072 tokens a rank, G = 8 cuts the ring's working
set from about 11 GiB to 1.5 GiB, for G times the calls and messages of 1/G the size each (heads
are independent: exact)."""


def head_groups(q_shape: tuple[int, ...], kv_heads: int, budget: int | None = None) -> int:
    """The fewest groups G (a divisor of the K/V heads) whose float32 per-group accumulator fits
    `budget` bytes (GROUP_BYTES); all K/V heads one by one when none does."""
    b, s, h, d = q_shape
    budget = GROUP_BYTES if budget is None else budget
    for g in range(1, kv_heads + 1):
        if kv_heads % g == 0 and b * s * (h // g) * d * 4 <= budget:
            return g
    return kv_heads


def call_elements(q_shape: tuple[int, ...], kv_heads: int) -> int:
    """Elements of the largest query (or output, or dQ) tensor one kernel call takes: a head
    group's query heads over every local row (head_groups)."""
    b, s, h, d = q_shape
    return b * s * (h // head_groups(q_shape, kv_heads)) * d


def check_index_edge(q_shape: tuple[int, ...], kv_heads: int, kernel: Kernel) -> None:
    """Refuse attention whose kernel calls would pass the kernel's 32-bit index edge, which fails
    or silently wraps (kernels.base.INDEX_EDGE): it takes about 4M tokens a rank at Llama-3-8B's
    heads, far past what a GPU holds, but is named rather than run."""
    edge = getattr(kernel, "index_edge", None)
    elements = call_elements(q_shape, kv_heads)
    if edge is None or elements < edge:
        return
    b, s, _, d = q_shape
    per_group = elements // (b * s * d)  # query heads a call takes
    raise BadValue(
        f"attention over {s:,} tokens a rank (micro-batch {b}): one {kernel.name} call would take {elements:,} "
        f"elements ({per_group} query heads of {d} for each K/V head), past the {edge:,} where its kernels index "
        f"with 32-bit integers; raise parallel.sp so a rank holds fewer than {edge // (b * per_group * d):,} tokens"
    )


def _group_slices(heads: int, kv_heads: int, groups: int):
    """(query heads, K/V heads) of each group: K/V heads g*n..(g+1)*n and the query heads that use them."""
    q_per, kv_per = heads // groups, kv_heads // groups
    return [(slice(g * q_per, (g + 1) * q_per), slice(g * kv_per, (g + 1) * kv_per)) for g in range(groups)]


def ring_forward(q, kv, spec: RingSpec, group) -> tuple[torch.Tensor, torch.Tensor]:
    """out in q's dtype, lse float32, one head group at a time (head_groups).
    # q (B, S_local, H, D); kv (2, B, S_local, H_kv, D): K and V stacked, as they travel"""
    check_index_edge(q.shape, kv.shape[3], spec.kernel)
    groups = head_groups(q.shape, kv.shape[3])
    if groups == 1:
        return _ring_forward_group(q, kv, spec, group)
    out = torch.empty_like(q)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    for qh, kh in _group_slices(q.shape[2], kv.shape[3], groups):
        _, lse_g = _ring_forward_group(q[:, :, qh], kv[:, :, :, kh].contiguous(), spec, group, into=out[:, :, qh])
        lse[:, :, qh] = lse_g
    return out, lse


def _ring_forward_group(q, kv, spec: RingSpec, group, into=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ring over one head group; the result cast into `into` when given."""
    b, s_local, h, d = q.shape
    acc = q.new_zeros(b, s_local, h, d, dtype=torch.float32)
    lse = q.new_full((b, s_local, h), float("-inf"), dtype=torch.float32)
    steps = spec.steps()
    # K/V travel unexpanded; this rank's own are saved for backward, so blocks arrive in two others
    recv = [torch.empty_like(kv) for _ in range(min(2, len(steps) - 1))]
    dst, src = _neighbours(spec)
    for step, calls in enumerate(steps):
        cur = kv if step == 0 else recv[(step - 1) % 2]
        pending = None
        if step + 1 < len(steps):
            pending = Exchange(cur, recv[step % 2], dst, src, group, tag=0)
        for rows, c in calls:
            with region(Region.KERNEL):
                out_b, lse_b = spec.kernel.forward(
                    q[rows, c.q0 : c.q1], cur[0, rows, c.k0 : c.k1], cur[1, rows, c.k0 : c.k1], c, spec.mask
                )
            merge_(acc[rows, c.q0 : c.q1], lse[rows, c.q0 : c.q1], out_b, lse_b)
            del out_b, lse_b  # before the next call's
        if pending is not None:
            pending.wait()
    if into is None:
        return acc.to(q.dtype), lse
    return into.copy_(acc), lse


def _block_grads(dout, q, kv, out, lse, calls, dq, dkv, spec: RingSpec) -> None:
    """Add this block's dQ into `dq` and its dK/dV into `dkv` (float32). # dkv (2, B, S_local, H_kv, D)"""
    for b, c in calls:
        qs, ks = slice(c.q0, c.q1), slice(c.k0, c.k1)
        with region(Region.KERNEL):
            dq_b, dk_b, dv_b = spec.kernel.backward(
                dout[b, qs], q[b, qs], kv[0, b, ks], kv[1, b, ks], out[b, qs], lse[b, qs], c, spec.mask
            )
        dq[b, qs] += dq_b
        dkv[0, b, ks] += dk_b
        dkv[1, b, ks] += dv_b
        del dq_b, dk_b, dv_b  # before the next call's


def ring_backward(dout, q, kv, out, lse, spec: RingSpec, group) -> tuple[torch.Tensor, torch.Tensor]:
    """dq and d(kv) in the input dtype, accumulated in float32, one head group at a time."""
    groups = head_groups(q.shape, kv.shape[3])
    if groups == 1:
        return _ring_backward_group(dout, q, kv, out, lse, spec, group)
    dq, dkv = torch.empty_like(q), torch.empty_like(kv)
    for qh, kh in _group_slices(q.shape[2], kv.shape[3], groups):
        _ring_backward_group(
            dout[:, :, qh],
            q[:, :, qh],
            kv[:, :, :, kh].contiguous(),
            out[:, :, qh],
            lse[:, :, qh],
            spec,
            group,
            into=(dq[:, :, qh], dkv[:, :, :, kh]),
        )
    return dq, dkv


def _ring_backward_group(dout, q, kv, out, lse, spec: RingSpec, group, into=None):
    """The ring's backward over one head group.

    Remote blocks come in the forward's order; the accumulator of block j starts on rank j+1
    and travels with the block, then goes home from the last rank that needs it while the
    owner computes the second half of its own block's gradients. Two accumulators alternate
    (one is computed into while the other is in flight) and one buffer receives: no buffer is
    allocated per step."""
    dq = torch.zeros_like(q, dtype=torch.float32)
    steps = spec.steps()
    last = len(steps) - 1
    own_first, own_second = spec.own_block_halves() if last > 0 else (steps[0], ())
    dst, src = _neighbours(spec)
    dkv_own = torch.zeros_like(kv, dtype=torch.float32)
    if last > 0:
        bufs = [torch.empty_like(kv), torch.empty_like(kv)]
        kv_pending = Exchange(kv, bufs[0], dst, src, group, tag=0)
        accs = [torch.empty_like(dkv_own), torch.empty_like(dkv_own)]
        arrived = torch.empty_like(dkv_own)
    _block_grads(dout, q, kv, out, lse, own_first, dq, dkv_own, spec)
    dkv_pending = home = None
    for step in range(1, last + 1):
        kv_pending.wait()
        kv_cur = bufs[(step - 1) % 2]
        if step < last:
            kv_pending = Exchange(kv_cur, bufs[step % 2], dst, src, group, tag=0)
        dkv = accs[step % 2].zero_()  # sent two steps ago, and that send was waited for last step
        _block_grads(dout, q, kv_cur, out, lse, steps[step], dq, dkv, spec)
        if dkv_pending is not None:
            dkv_pending.wait()
            dkv += arrived
        if step < last:
            dkv_pending = Exchange(dkv, arrived, dst, src, group, tag=1)
        else:
            home = Exchange(dkv, arrived, *_neighbours(spec, -last), group, tag=2)
    _block_grads(dout, q, kv, out, lse, own_second, dq, dkv_own, spec)
    if home is not None:
        home.wait()
        dkv_own += arrived
    if into is None:
        return dq.to(q.dtype), dkv_own.to(kv.dtype)
    return into[0].copy_(dq), into[1].copy_(dkv_own)


class KeptAttention:
    """Attention-aware checkpointing (Li et al. 2023, DistFlashAttn's rematerialization-aware
    checkpointing): one call site's attention outputs and log-sum-exps, kept from the forward of
    an activation-checkpointed layer so that the layer's recompute in backward takes them instead
    of running the ring forward again. Everything else in the layer (norms, projections, RoPE,
    MLP) is recomputed as before; the ring's backward gets the same q, k, v (recomputed, bit for
    bit), out and lse as without it, so the gradients are the same. Cost: the output and lse of
    every layer stay alive from forward to backward.

    Which forward a recompute belongs to is decided by content, never by order: each entry
    carries the fingerprints of q, k and v on every rank of the ring (gathered at forward; the
    output depends on nothing else), and a recompute takes the entry whose fingerprints equal
    those of its recomputed q, k, v, gathered the same way. So two forwards before one backward
    (losses summed), or a forward never followed by backward (evaluation with grad on), never hand
    a layer someone else's output; with no match, or with MAX_ENTRIES forwards pending, the ring
    simply runs again."""

    MAX_ENTRIES = 4
    __slots__ = ("entries",)

    def __init__(self):
        self.entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (fingerprints, out, lse)

    def take(self, prints: torch.Tensor):
        for i, (kept_prints, out, lse) in enumerate(self.entries):
            if torch.equal(kept_prints, prints):
                del self.entries[i]
                return out, lse
        return None

    def put(self, prints: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
        self.entries.append((prints, out, lse))
        del self.entries[: -self.MAX_ENTRIES]


def _fingerprints(q, k, v, spec: RingSpec, group) -> torch.Tensor:
    """q, k, v summarised on every rank of the ring, the same on all ranks: each tensor's sum
    (accumulated in float64, no copy) and a position-weighted sum of about 64 of its tokens.
    # (sp_size, 6)"""
    mine = []
    for x in (q, k, v):  # (B, S_local, heads, D), possibly strided
        x = x.detach()
        sample = x[:, :: max(1, x.shape[1] // 64)].double().reshape(-1)
        weights = torch.arange(1, sample.numel() + 1, device=x.device, dtype=torch.float64)
        mine += [x.sum(dtype=torch.float64), (sample * weights).sum()]
    mine = torch.stack(mine)
    if spec.sp_size == 1:
        return mine[None]
    every = [torch.empty_like(mine) for _ in range(spec.sp_size)]
    torch.distributed.all_gather(every, mine, group=group)
    return torch.stack(every)


def _in_backward() -> bool:
    """Whether autograd is running a backward pass now: where a checkpoint recomputes its layer."""
    return torch._C._current_graph_task_id() != -1


class RingAttentionFn(torch.autograd.Function):
    """q (B, S_local, H, D), k and v (B, S_local, H_kv, D). Saves K and V stacked, as the ring sends
    them, so backward needs no second copy."""

    @staticmethod
    @within(Region.RING)
    def forward(ctx, q, k, v, spec: RingSpec, group, kept: KeptAttention | None = None):
        prints = _fingerprints(q, k, v, spec, group) if kept is not None else None
        recompute = kept is not None and _in_backward()
        found = kept.take(prints) if recompute else None
        kv = torch.stack([k, v])  # (2, B, S_local, H_kv, D)
        if found is not None:
            out, lse = found[0].detach(), found[1]  # the checkpoint's recompute: no ring forward
        else:
            out, lse = ring_forward(q, kv, spec, group)
            if kept is not None and not recompute:
                kept.put(prints, out.detach(), lse)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.spec, ctx.group = spec, group
        return out

    @staticmethod
    @within(Region.RING)
    def backward(ctx, dout):
        q, kv, out, lse = ctx.saved_tensors
        dq, dkv = ring_backward(dout, q, kv, out, lse, ctx.spec, ctx.group)
        return dq, dkv[0], dkv[1], None, None, None
