"""Ulysses x ring: two-level sequence parallelism over N = U * R ranks.

Inside a Ulysses group of U neighbouring ranks (one node) an all-to-all trades sequence for
heads; across the R Ulysses groups the ring runs on those heads:

    (B, S/N, H, D) --all-to-all over U--> (B, S/R, H/U, D) --ring over R--> --all-to-all back-->

(DeepSpeed-Ulysses, Jacobs et al. 2023; Ulysses x ring as in USP, Fang & Zhao 2024.) Sequence
rank n = r * U + u (u: the rank in the Ulysses group, r: in the ring). Query heads split U ways;
K/V heads split when U divides them, repeated when U is a multiple of them, else refused. How
the sequence is cut so the ring's layout holds after the all-to-all, with an example:
docs/design.md, "Ulysses x ring". Groups are built once, collectively (ulysses_ring_group, or
the trainer's mesh), and passed as `group=` wherever a process group is accepted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ringpatch.errors import BadValue
from ringpatch.regions import Region, within


@dataclass(frozen=True, eq=False)
class UlyssesRing:
    """A sequence-parallel group of N = ulysses * ring ranks, and its two levels."""

    group: object
    """All N ranks, ordered by sequence rank r * ulysses + u (collectives over the sequence)."""
    ulysses_group: object
    """The `ulysses` adjacent ranks that trade sequence for heads."""
    ring_group: object
    """The `ring` ranks with this rank's Ulysses index."""
    ulysses: int
    ring: int

    @property
    def size(self) -> int:
        return self.ulysses * self.ring


def ulysses_degree(group) -> int:
    """U of a UlyssesRing group; 1 for a plain process group (or None)."""
    return group.ulysses if isinstance(group, UlyssesRing) else 1


def check_ulysses(ulysses, sp_size: int) -> None:
    if isinstance(ulysses, bool) or not isinstance(ulysses, int) or ulysses < 1:
        raise BadValue(f"ulysses must be a positive int, got {ulysses!r}")
    if sp_size % ulysses:
        raise BadValue(
            f"ulysses={ulysses} does not divide the {sp_size} sequence-parallel ranks; choose ulysses among "
            f"{[d for d in range(1, sp_size + 1) if sp_size % d == 0]} (ring = ranks / ulysses)"
        )


def splits_heads(heads: int, kv_heads: int, ulysses: int) -> bool:
    """Whether U can take these head counts: it divides the query heads, and the K/V heads divide
    by it (split) or it by them (repeated)."""
    return heads % ulysses == 0 and (kv_heads % ulysses == 0 or ulysses % kv_heads == 0)


def check_heads(heads: int, kv_heads: int, ulysses: int, sp: int | None = None) -> None:
    """Query heads split U ways; K/V heads split (U <= H_kv) or repeated (U a multiple of H_kv).
    `sp`, when known, narrows the degrees the message offers to those that divide it."""
    if heads % ulysses:
        problem = f"does not divide the {heads} query heads (per tensor-parallel rank)"
    elif kv_heads % ulysses and ulysses % kv_heads:
        problem = (
            f"neither divides the {kv_heads} key/value heads (per tensor-parallel rank) nor is a multiple of them, "
            "so the K/V heads cannot follow their query heads"
        )
    else:
        return  # (ulysses 1 always passes; this runs at every attention call, the choices only on error)
    choices = [d for d in range(1, heads + 1) if splits_heads(heads, kv_heads, d) and (sp is None or sp % d == 0)]
    raise BadValue(f"ulysses={ulysses} {problem}; choose ulysses among {choices}")


def kv_repeats(kv_heads: int, ulysses: int) -> int:
    """How many times each K/V head is repeated before the all-to-all (1: split, not repeated)."""
    return 1 if kv_heads % ulysses == 0 else ulysses // kv_heads


def _check_node(members: list[int], ulysses: int) -> None:
    """A Ulysses group must not cross nodes when the launcher says how many ranks a node holds."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if not local or not local.isdigit() or int(local) < 1:
        return
    local = int(local)
    for i in range(0, len(members), ulysses):
        part = members[i : i + ulysses]
        nodes = sorted({m // local for m in part})
        if len(nodes) > 1:
            raise BadValue(
                f"the Ulysses group of ranks {part} spans nodes {nodes} ({local} ranks per node): its all-to-all "
                f"would cross the slow link. Choose ulysses (with tp) that divides {local}, and a sequence group of "
                "adjacent ranks"
            )


def ulysses_ring_group(ulysses: int, group=None) -> UlyssesRing:
    """Split the sequence-parallel `group` (None: every rank) into Ulysses groups of `ulysses`
    adjacent ranks and rings across them. Collective over the default group: every process calls
    it, each with its own sequence group (groups of several data-parallel replicas are all built)."""
    if not dist.is_available() or not dist.is_initialized():
        raise BadValue("ulysses_ring_group needs torch.distributed initialised (init_process_group first)")
    group = group if group is not None else dist.group.WORLD
    members = dist.get_process_group_ranks(group)
    problem = None
    try:  # checked on every rank, then shared, so a misuse on one rank raises on all of them
        check_ulysses(ulysses, len(members))
        if members != sorted(members):
            raise BadValue(f"the sequence group's ranks {members} must be in increasing order")
    except ValueError as exc:
        problem = str(exc)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (tuple(members), ulysses, problem))
    if problem is not None:
        raise BadValue(problem)
    refused = [r for r, (_, _, p) in enumerate(everyone) if p is not None]
    if refused:
        raise BadValue(f"ulysses_ring_group was refused on rank(s) {refused}: {everyone[refused[0]][2]}")
    everyone = [(m, u) for m, u, _ in everyone]
    degrees = sorted({u for _, u in everyone})
    if len(degrees) > 1:
        raise BadValue(f"the ranks asked for different ulysses degrees {degrees}; pass the same on every rank")
    groups = sorted({m for m, _ in everyone})
    seen: dict[int, tuple] = {}
    for g in groups:
        for m in g:
            if m in seen:
                raise BadValue(
                    f"the ranks passed sequence groups that overlap without being equal ({list(seen[m])} and "
                    f"{list(g)}); every rank must pass its own sequence group, and those groups must partition the ranks"
                )
            seen[m] = g
    for g in groups:
        _check_node(list(g), ulysses)
    mine_u = mine_r = None
    me = dist.get_rank()
    for g in groups:  # the same order on every rank: new_group is collective over the world
        ring = len(g) // ulysses
        for r in range(ring):
            ranks = list(g[r * ulysses : (r + 1) * ulysses])
            pg = dist.new_group(ranks) if ulysses > 1 else None
            if me in ranks:
                mine_u = pg
        for u in range(ulysses):
            ranks = list(g[u::ulysses])
            pg = dist.new_group(ranks)
            if me in ranks:
                mine_r = pg
    return UlyssesRing(group, mine_u, mine_r, ulysses, len(members) // ulysses)


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """all_to_all_single over dim 0 of x (U, ...): part j goes to rank j, part j of the result
    came from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, group, u: int) -> torch.Tensor:
    """(B, L, H, D) tokens of this rank, all heads -> (B, U*L, H/U, D) the group's tokens, my heads."""
    b, n, h, d = x.shape
    parts = _all_to_all(x.view(b, n, u, h // u, d).permute(2, 0, 1, 3, 4), group)  # (U, B, L, H/U, D) by source
    return parts.permute(1, 0, 2, 3, 4).reshape(b, u * n, h // u, d)


def _heads_to_seq(x: torch.Tensor, group, u: int) -> torch.Tensor:
    """(B, U*L, H/U, D) the group's tokens, my heads -> (B, L, H, D) my tokens, all heads."""
    b, n, h, d = x.shape
    parts = _all_to_all(x.view(b, u, n // u, h, d).permute(1, 0, 2, 3, 4), group)  # (U, B, L, H/U, D) by source
    return parts.permute(1, 2, 0, 3, 4).reshape(b, n // u, u * h, d)


class Trade(torch.autograd.Function):
    """One all-to-all of a Ulysses group, sequence for heads (to_heads) or back; its backward is
    the other direction."""

    @staticmethod
    @within(Region.ALL_TO_ALL)
    def forward(ctx, x, group, u: int, to_heads: bool):
        ctx.group, ctx.u, ctx.to_heads = group, u, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group, u)

    @staticmethod
    @within(Region.ALL_TO_ALL)
    def backward(ctx, grad):
        return (_heads_to_seq if ctx.to_heads else _seq_to_heads)(grad, ctx.group, ctx.u), None, None, None


@within(Region.ALL_TO_ALL)
def scatter_heads(q, k, v, hybrid: UlyssesRing):
    """This rank's (B, L, H, D) q and (B, L, H_kv, D) k, v -> its Ulysses group's tokens on this
    rank's heads: (B, U*L, H/U, D), (B, U*L, max(H_kv/U, 1), D)."""
    u, group = hybrid.ulysses, hybrid.ulysses_group
    repeats = kv_repeats(k.shape[2], u)
    kv = torch.stack([k, v], dim=3)  # (B, L, H_kv, 2, D): one all-to-all for both
    if repeats > 1:
        kv = kv.repeat_interleave(repeats, dim=2)
    b, n, hkv, _, d = kv.shape
    kv = Trade.apply(kv.reshape(b, n, hkv * 2, d), group, u, True).view(b, u * n, hkv // u, 2, d)
    return Trade.apply(q, group, u, True), kv[:, :, :, 0], kv[:, :, :, 1]


def gather_heads(out: torch.Tensor, hybrid: UlyssesRing) -> torch.Tensor:
    """The ring's (B, U*L, H/U, D) output -> this rank's tokens on all heads (B, L, H, D)."""
    return Trade.apply(out, hybrid.ulysses_group, hybrid.ulysses, False)
