"""The planner's sequence-parallel traffic: the counts of plan/traffic.py against a hand count,
and the Ulysses degree it recommends."""

from __future__ import annotations

import pytest

from ringpatch.plan.traffic import recommend, traffic, ulysses_choices

pytestmark = pytest.mark.unit

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)


def test_ring_and_all_to_all_bytes_by_hand():
    cfg = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)  # head_dim 16
    t = 100
    ring = traffic(cfg, sp=4, tp=1, ulysses=1, tokens=t, checkpointing=False, gpus_per_node=8)
    bkv = t * 2 * 32 * 2  # K and V, 2 heads x 16, 2 bytes
    assert ring.ring_bytes == 3 * bkv * 4 and ring.all_to_all == 0 and not ring.ring_crosses_nodes
    hybrid = traffic(cfg, sp=4, tp=1, ulysses=2, tokens=t, checkpointing=True, gpus_per_node=2)
    assert hybrid.ring == 2 and hybrid.ring_crosses_nodes
    assert hybrid.ring_bytes == 1 * bkv * (2 + 1 + 2)  # the forward twice under checkpointing
    assert hybrid.all_to_all == 0.5 * t * (2 * 64 + 2 * 32) * 2 * 3
    assert hybrid.inter_node == hybrid.ring_bytes and hybrid.intra_node == hybrid.all_to_all
    mqa = traffic(
        dict(cfg, num_key_value_heads=1), sp=4, tp=1, ulysses=4, tokens=t, checkpointing=False, gpus_per_node=8
    )
    assert mqa.ring == 1 and mqa.ring_bytes == 0  # K/V repeated 4 times, no ring
    assert mqa.all_to_all == 0.75 * t * (2 * 64 + 2 * 16 * 4) * 2 * 2


def test_choices_respect_heads_tp_and_the_node():
    assert ulysses_choices(LLAMA3_8B, sp=32, tp=1, gpus_per_node=8) == [1, 2, 4, 8]
    assert ulysses_choices(LLAMA3_8B, sp=16, tp=2, gpus_per_node=8) == [1, 2, 4]
    assert ulysses_choices(dict(LLAMA3_8B, num_attention_heads=12, num_key_value_heads=3), 8, 1, 8) == [1]


def test_recommendation_moves_the_ring_off_the_slow_link():
    tokens = 32768
    best = recommend(LLAMA3_8B, sp=32, tp=1, tokens=tokens, checkpointing=True, gpus_per_node=8)
    ring_only = traffic(LLAMA3_8B, 32, 1, 1, tokens, True, 8)
    assert best.ulysses == 8 and best.ring == 4
    assert best.inter_node < ring_only.inter_node / 10  # 3 ring hops instead of 31
    one_node = recommend(LLAMA3_8B, sp=8, tp=1, tokens=tokens, checkpointing=True, gpus_per_node=8)
    assert one_node.inter_node == 0 and one_node.ulysses == 8  # counted as exposed, the ring moves more


def test_recommendation_counts_what_the_compute_hides():
    """64K tokens over 32 GPUs: 2048 per row, 16 rows. A ring step of U x 2048 queries on 32 / U
    heads sends U x 2048 x 2 x 1024 / U x 2 bytes: U x 2048 x 4096 / 1024 / 2 = U x 4096 FLOPs
    per byte. U = 4 is the smallest degree past the 10,000 that InfiniBand needs."""
    for u, want in ((1, 4096), (2, 8192), (4, 16384), (8, 32768)):
        assert traffic(LLAMA3_8B, 32, 1, u, 16 * 2048, True, 8, row=2048).step_intensity == want
    four_nodes = recommend(LLAMA3_8B, sp=32, tp=1, tokens=16 * 2048, checkpointing=True, gpus_per_node=8, row=2048)
    assert (four_nodes.ulysses, four_nodes.ring, four_nodes.ring_hidden) == (4, 8, True)
    assert four_nodes.exposed() == (0.0, four_nodes.all_to_all)
    # one node, 256K over 8 GPUs: the in-node ring step (65,536 FLOPs per byte) hides behind NVLink's 1,000
    one_node = recommend(LLAMA3_8B, sp=8, tp=1, tokens=32768, checkpointing=True, gpus_per_node=8, row=32768)
    assert one_node.ulysses == 1 and one_node.exposed() == (0.0, 0.0)
