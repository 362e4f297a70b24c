"""ParallelDims: how the world splits into data, sequence and tensor parallelism, and every
fact derived from that split (group sizes, coordinates, the sequence-length divisor).

world = dp * sp * tp, tp innermost (neighbouring ranks, same node), sp next, dp outermost:
rank = (dp_rank * sp + sp_rank) * tp + tp_rank. Every rank of one dp index sees the same
sample; ZeRO sharding and gradient averaging span dp x sp (all ranks with one tp index).
sp = ring * ulysses, Ulysses inside: sp_rank = ring_rank * ulysses + ulysses_rank, so the grid
order, innermost first, is tp, ulysses, ring, dp, and a Ulysses group (with its tp ranks)
is ulysses * tp neighbouring ranks, one node.
Validated when built, with the numbers in every message.
"""

from __future__ import annotations

from dataclasses import dataclass

from ringpatch.attention.layout import DEFAULT_LAYOUT, Layout, check_layout, num_chunks
from ringpatch.attention.ulysses import check_heads as check_ulysses_heads
from ringpatch.attention.ulysses import check_ulysses
from ringpatch.errors import BadValue


@dataclass(frozen=True)
class ParallelDims:
    """How `world` ranks split into data, sequence and tensor parallelism."""

    world: int
    sp: int = 1
    """Sequence-parallel (ring) ranks per sample."""
    tp: int = 1
    """Tensor-parallel ranks per layer shard."""
    layout: Layout = DEFAULT_LAYOUT
    """How a sample's tokens are laid out over the sp ranks."""
    ulysses: int = 1
    """Of the sp ranks, how many neighbours trade sequence for heads (all-to-all); the ring
    runs over the other factor, sp / ulysses."""

    def __post_init__(self):
        for name in ("world", "sp", "tp", "ulysses"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadValue(f"{name} must be a positive int, got {value!r}")
        check_layout(self.layout)
        check_ulysses(self.ulysses, self.sp)
        if self.world % (self.sp * self.tp):
            raise BadValue(
                f"world size {self.world} is not divisible by sp*tp = {self.sp}*{self.tp} = {self.sp * self.tp}; "
                f"dp = world / (sp*tp) must be whole: change sp or tp, or launch a multiple of {self.sp * self.tp} ranks"
            )

    @property
    def dp(self) -> int:
        return self.world // (self.sp * self.tp)

    @property
    def ring(self) -> int:
        """Ranks of one ring: sp / ulysses."""
        return self.sp // self.ulysses

    @property
    def seq_len_divisor(self) -> int:
        """Every sample length must be a multiple of this: the layout's chunk count over sp."""
        return num_chunks(self.layout, self.sp)

    def round_up(self, seq_len: int) -> int:
        """The shortest length >= seq_len that the layout can cut."""
        return -(-seq_len // self.seq_len_divisor) * self.seq_len_divisor

    def check_heads(self, heads: int, kv_heads: int) -> None:
        """Tensor parallelism splits attention heads: both head counts must divide by tp; then
        Ulysses splits each tp rank's heads (query heads by ulysses; K/V heads split or repeated)."""
        for name, count in (("attention heads", heads), ("key/value heads", kv_heads)):
            if count % self.tp:
                raise BadValue(
                    f"{name} {count} are not divisible by tp={self.tp}; choose tp among "
                    f"{[d for d in range(1, count + 1) if heads % d == 0 and kv_heads % d == 0]}"
                )
        check_ulysses_heads(heads // self.tp, kv_heads // self.tp, self.ulysses, self.sp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp_rank, sp_rank, tp_rank) of a global rank."""
        return rank // (self.sp * self.tp), (rank // self.tp) % self.sp, rank % self.tp

    def check_node(self, ranks_per_node: int) -> None:
        """A Ulysses group and its tp ranks must sit in one node: ulysses * tp divides the node."""
        span = self.ulysses * self.tp
        if self.ulysses > 1 and ranks_per_node % span:
            raise BadValue(
                f"ulysses={self.ulysses} x tp={self.tp} = {span} neighbouring ranks do not fit evenly in a node of "
                f"{ranks_per_node} ranks, so some Ulysses all-to-alls would cross nodes; choose ulysses among "
                f"{[d for d in range(1, self.sp + 1) if self.sp % d == 0 and ranks_per_node % (d * self.tp) == 0]}"
            )
