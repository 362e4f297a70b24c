"""Sequence-parallel communication per rank and step, ring alone vs Ulysses x ring (printed by
`ringpatch plan`), and the Ulysses degree it recommends: the one that leaves the fewest bytes
exposed, across nodes first. The byte counts and the rule for when a ring step hides its
transfer: docs/design.md, "Sequence-parallel traffic".
"""

from __future__ import annotations

from dataclasses import dataclass

from ringpatch.attention.ulysses import kv_repeats, splits_heads
from ringpatch.hf.counts import attention_shape

GIB = 2**30
HIDES_ACROSS_NODES = 10_000  # attention FLOPs per byte sent that hide a ring step over InfiniBand
HIDES_IN_NODE = 1_000  # ... over NVLink


@dataclass(frozen=True)
class Traffic:
    """Bytes one rank sends per optimizer micro-step, all layers, forward and backward."""

    ulysses: int
    ring: int
    all_to_all: float
    """Ulysses all-to-all bytes (inside a node)."""
    ring_bytes: float
    """Ring bytes."""
    ring_crosses_nodes: bool
    step_intensity: float | None = None
    """Attention FLOPs per byte a ring step sends (None: no ring, R = 1)."""

    @property
    def inter_node(self) -> float:
        return self.ring_bytes if self.ring_crosses_nodes else 0.0

    @property
    def intra_node(self) -> float:
        return self.all_to_all + (0.0 if self.ring_crosses_nodes else self.ring_bytes)

    @property
    def ring_hidden(self) -> bool:
        """Whether each ring step's compute covers its transfer (by the intensity thresholds)."""
        need = HIDES_ACROSS_NODES if self.ring_crosses_nodes else HIDES_IN_NODE
        return self.ring_bytes == 0 or (self.step_intensity is not None and self.step_intensity >= need)

    def exposed(self) -> tuple[float, float]:
        """(bytes across nodes, bytes inside a node) that the compute does not hide."""
        ring = 0.0 if self.ring_hidden else self.ring_bytes
        return (ring, self.all_to_all) if self.ring_crosses_nodes else (0.0, self.all_to_all + ring)


def traffic(
    cfg: dict, sp: int, tp: int, ulysses: int, tokens: int, checkpointing: bool, gpus_per_node: int, row: int = 0
) -> Traffic:
    """`tokens`: the micro-batch's tokens per rank (micro_batch x seq_len / sp); `row`: of them,
    one row's (seq_len / sp), for the ring step's intensity (0: not computed)."""
    layers = cfg["num_hidden_layers"]
    heads, kv_heads, head_dim = attention_shape(cfg)
    kv_dim, q_dim = kv_heads * head_dim, heads * head_dim
    rep = kv_repeats(kv_heads // tp, ulysses) if ulysses > 1 else 1
    ring = sp // ulysses
    forwards = 2 if checkpointing else 1
    bkv = tokens * 2 * kv_dim / tp * 2 * rep
    ring_bytes = layers * bkv * (ring - 1) * (forwards + 1 + 2)  # K/V per forward, K/V + float32 dK/dV backward
    per_a2a = (ulysses - 1) / ulysses * tokens * (2 * q_dim + 2 * kv_dim * rep) / tp * 2
    a2a = layers * per_a2a * (forwards + 1)
    intensity = ulysses * row * q_dim / kv_dim / (2 * rep) if ring > 1 and row else None
    return Traffic(ulysses, ring, a2a, ring_bytes, sp * tp > gpus_per_node, intensity)


def ulysses_choices(cfg: dict, sp: int, tp: int, gpus_per_node: int) -> list[int]:
    """Ulysses degrees the grid allows: U divides sp and the query heads per tp rank, the K/V
    heads per tp rank divide U or U divides them, and U x tp ranks fit in a node."""
    heads, kv_heads, _ = attention_shape(cfg)
    return [
        u
        for u in range(1, sp + 1)
        if sp % u == 0 and splits_heads(heads // tp, kv_heads // tp, u) and gpus_per_node % (u * tp) == 0
    ]


def recommend(
    cfg: dict, sp: int, tp: int, tokens: int, checkpointing: bool, gpus_per_node: int, row: int = 0
) -> Traffic:
    """The Ulysses degree that leaves the fewest bytes exposed across nodes, then inside a node,
    then the smallest degree (its all-to-all has the fewest peers). Without `row` every ring step
    counts as exposed."""
    options = [
        traffic(cfg, sp, tp, u, tokens, checkpointing, gpus_per_node, row)
        for u in ulysses_choices(cfg, sp, tp, gpus_per_node)
    ]
    return min(options, key=lambda t: (*(round(b) for b in t.exposed()), t.ulysses))


def describe_traffic(
    cfg: dict, sp: int, tp: int, ulysses: int, tokens: int, checkpointing: bool, gpus_per_node: int, row: int
) -> list[str]:
    """Lines for the plan: ring alone, the recipe's degree, and the recommended one."""
    if sp == 1:
        return []
    args = (tokens, checkpointing, gpus_per_node, row)
    rows = {1: traffic(cfg, sp, tp, 1, *args), ulysses: traffic(cfg, sp, tp, ulysses, *args)}
    best = recommend(cfg, sp, tp, *args)
    rows[best.ulysses] = best
    lines = [
        f"sequence-parallel traffic per GPU and micro-batch at {row * sp} tokens (all layers, fwd + bwd), "
        f"{gpus_per_node} GPUs per node; a ring step hides its transfer when its FLOPs per byte exceed the GPU's "
        f"FLOP/s over the link's bytes/s (taken as {HIDES_ACROSS_NODES:,} over InfiniBand, {HIDES_IN_NODE:,} over "
        "NVLink); all-to-alls are exposed:"
    ]
    for u, t in sorted(rows.items()):
        tags = [name for name, v in (("recipe", ulysses), ("recommended", best.ulysses)) if v == u]
        step = (
            f"{t.step_intensity:,.0f} FLOP/byte ({'hidden' if t.ring_hidden else 'exposed'})"
            if t.step_intensity
            else "no ring"
        )
        lines.append(
            f"  ulysses {u:>2} x ring {t.ring:>3}: all-to-all {t.all_to_all / GIB:7.2f} GiB (in node), ring "
            f"{t.ring_bytes / GIB:7.2f} GiB ({'across nodes' if t.ring_crosses_nodes else 'in node'}), ring step "
            f"{step}" + (f"  <- {', '.join(tags)}" if tags else "")
        )
    return lines
