"""The reserve's NCCL buffers, per communicator a step runs, against the published figures they come
from (NVIDIA/nccl#964: 544 MB for a 2-member and 688 MB for a larger communicator after one
all-reduce; NVIDIA/nccl#1685: 1.06 -> 4.34 GB after the first all-to-all over 8 H100s), and ZeRO-3's
gathered weights (the replay of its coordinator) at Llama-3-8B's size."""

from __future__ import annotations

import pytest

from ringpatch.hf.counts import parameters
from ringpatch.parallel.dims import ParallelDims
from ringpatch.plan.reserve import communicators, zero_buffers

pytestmark = pytest.mark.unit

PER_PEER = (4.34e9 - 1.06e9) / 7
LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}  # fmt: skip


def _nccl(dims: ParallelDims) -> dict[str, float]:
    return {g.name: g.nccl_bytes() for g in communicators(dims)}


def test_the_ring_alone_on_one_node_is_one_communicator_with_two_peers():
    """sp 8 over 8 ranks: the sequence group is the whole world, torch's default group: one
    communicator, its collectives' buffers and point-to-point buffers to the ring's two neighbours."""
    assert _nccl(ParallelDims(8, sp=8)) == {"world": pytest.approx(688e6 + 2 * PER_PEER)}
    assert _nccl(ParallelDims(2, sp=2)) == {"world": pytest.approx(544e6 + PER_PEER)}  # one neighbour
    assert _nccl(ParallelDims(1)) == {"world": 0.0}


def test_ulysses_times_ring_adds_an_all_to_all_group_and_a_ring_group():
    """Ulysses 4 x ring 8 over 32 ranks: the world (the sequence group is all of it), the all-to-all
    group of 4 with 3 peers, the ring group of 8 with its 2 neighbours; the all-to-all over 8 H100s
    of the published figure is its own size."""
    found = _nccl(ParallelDims(32, sp=32, ulysses=4))
    assert found == {
        "world": pytest.approx(688e6),
        "Ulysses all-to-all": pytest.approx(688e6 + 3 * PER_PEER),
        "ring": pytest.approx(688e6 + 2 * PER_PEER),
    }
    eight = _nccl(ParallelDims(16, sp=16, ulysses=8))["Ulysses all-to-all"]
    assert eight - 688e6 == pytest.approx(4.34e9 - 1.06e9)


def test_data_and_tensor_parallel_groups_are_their_own_communicators():
    found = _nccl(ParallelDims(16, sp=4, tp=2))
    assert found == {
        "world": pytest.approx(688e6),
        "sequence (ring)": pytest.approx(688e6 + 2 * PER_PEER),
        "tensor parallel": pytest.approx(544e6),
    }


def test_zero3_gathered_weights_follow_the_live_limit_the_prefetched_embedding_and_the_reuse_distance():
    """The replay of DeepSpeed's coordinator (held to a DeepSpeed engine in test_zero_buffers.py) at
    Llama-3-8B's size: the live limit bounds prefetching (a layer's backward holds less with less);
    at layer 0 the embedding is prefetched for the last backward, beside the layer; a model smaller
    than stage3_max_reuse_distance stays whole whatever the limit."""
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    embed = 128256 * 4096

    def gathered(**zero):
        return zero_buffers({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 1e8} | zero}, LLAMA_8B, 2)

    held = [gathered(stage3_max_live_parameters=live)["layer"] / 2 for live in (1e8, 3e8, 1e9)]
    assert held == sorted(held) and held[0] < held[-1]
    assert held[1] >= embed + layer
    assert gathered(stage3_max_live_parameters=3e8)["loss"] / 2 >= embed  # the LM head through the loss
    small = dict(LLAMA_8B, num_hidden_layers=1, vocab_size=1024)  # a step's trace of 0.67e9 weights
    whole = parameters(small)[0] - 3 * 4096  # the norms are under the persistence threshold
    config = {"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1e6, "stage3_max_reuse_distance": 1e9}}
    found = zero_buffers(config, small, 2)
    assert found["loss"] == whole * 2  # at the LM head every weight is gathered, kept for its next use
    assert found["layer"] == (whole - 1024 * 4096) * 2  # the LM head's was its last use


def test_the_reserve_reads_the_nccl_environment_the_trainer_sets(monkeypatch):
    """NCCL_BUFFSIZE scales the figures (measured at NCCL's 4 MiB); NVLS, when the user turns it on,
    adds its buffers to each communicator of more than 2 members; the trainer turns it off unless set."""
    import os

    from ringpatch.parallel import nccl_settings
    from ringpatch.plan.reserve import NVLS_BYTES, Communicator

    ring = Communicator("sequence (ring)", 8, 2)
    base = 688e6 + 2 * PER_PEER
    assert ring.nccl_bytes({}) == pytest.approx(base)
    assert ring.nccl_bytes({"NCCL_BUFFSIZE": str(2 * 2**20)}) == pytest.approx(base / 2)
    assert ring.nccl_bytes({"NCCL_NVLS_ENABLE": "1"}) == pytest.approx(base + NVLS_BYTES)
    assert Communicator("pair", 2).nccl_bytes({"NCCL_NVLS_ENABLE": "1"}) == pytest.approx(544e6)
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    nccl_settings()
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    nccl_settings()
    assert os.environ["NCCL_NVLS_ENABLE"] == "1" and ring.nccl_bytes() == pytest.approx(base + NVLS_BYTES)
