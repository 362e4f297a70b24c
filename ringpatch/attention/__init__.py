"""Exact attention over a sequence split across the ranks of a process group.

The bottom layer: it imports torch and nothing of transformers or deepspeed.

  api.py      ring_attention, the public entry: every argument checked once, on every rank
  layout.py   which global positions each rank holds (contiguous, zigzag); shard / unshard
  blocks.py   the block planner: which (query, key) blocks a ring step computes, with which mask
  documents.py  document boundaries of packed sequences (cu_seqlens), checked once
  balance.py  the balanced layout: chunks placed by their work under the documents
  kernels/    local block backends behind one protocol, one module per backend
  merge.py    merging partial results through their log-sum-exp
  ring.py     the ring: forward and backward over the group, communication overlapped
  comm.py     neighbour exchange, group resolution, a differentiable sum over the group
  ulysses.py  Ulysses x ring: all-to-all over heads inside a node, the ring across nodes
"""

from ringpatch.attention.api import ring_attention
from ringpatch.attention.kernels import BACKENDS, Backend
from ringpatch.attention.layout import LAYOUTS, Layout, shard, unshard
from ringpatch.attention.ulysses import UlyssesRing, ulysses_ring_group

__all__ = [
    "ring_attention",
    "shard",
    "unshard",
    "ulysses_ring_group",
    "UlyssesRing",
    "Layout",
    "LAYOUTS",
    "Backend",
    "BACKENDS",
]
