"""The ring's exchanges pair up on every rank, proved without a GPU.

A mis-paired send or receive hangs a cluster, and the ring has never run at P > 1 on GPUs. Each
rank of a P-rank step is simulated in turn on fake tensors over torch's `fake` process group (the
simulator's: ringpatch.plan.simulate, the CUDA kernel module's calls), forward and backward, with
every Exchange recorded instead of sent: its peers as global ranks, its buffers' shapes and dtypes,
its tag, in issue order. NCCL and gloo match point-to-point messages between two ranks in the order
they are posted, so the step is well paired when, for every ordered pair of ranks (a, b), the
sends a posts to b and the receives b posts from a are the same sequence (tag, shape, dtype), and
every rank issues its exchanges in one order of pairs with its peers (no rank waits on a message
its peer posts only later). Causal, windowed and document-masked steps, every layout, head groups
(several exchanges per layer), and Ulysses x ring at the shipped grids' shapes.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.unit

HEAD_DIM = 64


def _record_step(monkeypatch, world, rank, tokens, heads, kv_heads, ulysses, causal, window, layout, docs, group_bytes):
    """Rank `rank`'s exchanges in one forward and backward of ring_attention, in issue order."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import ringpatch
    from ringpatch.attention import ring
    from ringpatch.plan.simulate import SimulatedCUDA, fake_world

    posted = []

    class Recorded:
        def __init__(self, send, recv, dst, src, group, tag):
            posted.append(
                {
                    "to": dist.get_global_rank(group, dst),
                    "from": dist.get_global_rank(group, src),
                    "send": (tuple(send.shape), send.dtype),
                    "recv": (tuple(recv.shape), recv.dtype),
                    "tag": tag,
                }
            )

        def wait(self):
            pass

    monkeypatch.setattr(ring, "Exchange", Recorded)
    monkeypatch.setattr(ring, "GROUP_BYTES", group_bytes)
    cu = None if docs is None else torch.tensor(docs, dtype=torch.int32)
    local = tokens // world
    with fake_world(world, rank):
        group = ringpatch.ulysses_ring_group(ulysses) if ulysses > 1 else None
        with FakeTensorMode(allow_non_fake_inputs=True):
            q = torch.empty(1, local, heads, HEAD_DIM, dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.empty(1, local, kv_heads, HEAD_DIM, dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
        # outside the mode, so the block planner's host arithmetic (the balanced layout's work per
        # chunk) runs on real tensors; every op on q, k, v still runs fake
        out = ringpatch.ring_attention(q, k, v, group=group, causal=causal, window=window, layout=layout,
                                       cu_seqlens=cu, backend=SimulatedCUDA(), agreed=True)  # fmt: skip
        out.backward(torch.empty_like(out))
    return posted


def _assert_paired(every: dict[int, list[dict]]) -> None:
    """Per ordered pair (a, b): a's sends to b == b's receives from a, in order; and no cycle of
    waits: the k-th exchange of every rank is matched by the k-th of its peers (ring exchanges
    are posted in lock step, each a send and a receive issued together)."""
    world = len(every)
    counts = {r: len(p) for r, p in every.items()}
    assert len(set(counts.values())) == 1, f"ranks post different numbers of exchanges: {counts}"
    for a, b in itertools.permutations(range(world), 2):
        sends = [(p["tag"], p["send"]) for p in every[a] if p["to"] == b]
        recvs = [(p["tag"], p["recv"]) for p in every[b] if p["from"] == a]
        assert sends == recvs, f"rank {a} -> {b}: {len(sends)} sends {sends[:3]} vs {len(recvs)} receives {recvs[:3]}"
    for i in range(counts[0]):
        for a in range(world):
            p = every[a][i]
            peer = every[p["to"]][i]
            assert peer["from"] == a and peer["tag"] == p["tag"], (
                f"exchange {i}: rank {a} sends to {p['to']}, which receives from {peer['from']}"
            )


def _documents(tokens, sizes):
    """cu_seqlens of documents of `sizes` repeated to fill `tokens`, the last one cut."""
    cu, at = [0], 0
    for n in itertools.cycle(sizes):
        at = min(tokens, at + n)
        cu.append(at)
        if at == tokens:
            return cu


CASES = {  # name: (world, tokens, heads, kv_heads, ulysses, causal, window, layout, docs, group_bytes)
    "P=2 zigzag causal": (2, 256, 8, 2, 1, True, None, "zigzag", None, 256 * 2**20),
    "P=4 contiguous causal": (4, 512, 8, 2, 1, True, None, "contiguous", None, 256 * 2**20),
    "P=8 zigzag causal, head groups": (8, 1024, 8, 2, 1, True, None, "zigzag", None, 1),
    "P=8 zigzag windowed, head groups": (8, 1024, 8, 2, 1, True, 100, "zigzag", None, 1),
    "P=3 contiguous non-causal": (3, 384, 4, 4, 1, False, None, "contiguous", None, 256 * 2**20),
    "P=8 balanced documents, head groups": (8, 1024, 8, 2, 1, True, None, "balanced", [300, 33, 5, 500], 1),
    "P=4 zigzag documents": (4, 1024, 8, 2, 1, True, None, "zigzag", [3, 500, 17, 64], 256 * 2**20),
    "P=8 contiguous documents shorter than a rank's part": (8, 1024, 8, 2, 1, True, None, "contiguous", [40, 9], 1),
    "Ulysses 2 x ring 8 (mistral-7b-512k), balanced documents": (
        16,
        2048,
        8,
        2,
        2,
        True,
        None,
        "balanced",
        [900, 1148],
        256 * 2**20,
    ),
    "Ulysses 4 x ring 8 (llama3-8b-1m), zigzag": (32, 4096, 32, 8, 4, True, None, "zigzag", None, 1),
}


def _tiered(name: str):
    """Grids of 8 ranks and more simulate every rank in turn (seconds each): outside the fast tier."""
    world = CASES[name][0]
    return pytest.param(name, marks=pytest.mark.multiprocess) if world >= 8 else name


@pytest.mark.parametrize("case", [_tiered(name) for name in CASES])
def test_every_send_has_its_receive_on_every_rank(case, monkeypatch):
    world, tokens, heads, kv_heads, ulysses, causal, window, layout, docs, group_bytes = CASES[case]
    cu = None if docs is None else _documents(tokens, docs)
    every = {
        r: _record_step(
            monkeypatch, world, r, tokens, heads, kv_heads, ulysses, causal, window, layout, cu, group_bytes
        )
        for r in range(world)
    }
    assert every[0], "no exchange recorded: the ring did not run"
    _assert_paired(every)


def test_the_pairing_check_catches_a_rank_that_skips_an_exchange():
    """The check fails when one rank leaves out a send (as a rank skipping an empty step would)."""
    ring = [
        [{"to": (r + 1) % 4, "from": (r - 1) % 4, "send": ((1,), torch.bfloat16), "recv": ((1,), torch.bfloat16),
          "tag": t} for t in (0, 0, 1)]
        for r in range(4)
    ]  # fmt: skip
    _assert_paired(dict(enumerate(ring)))
    ring[2] = ring[2][:1] + ring[2][2:]
    with pytest.raises(AssertionError):
        _assert_paired(dict(enumerate(ring)))
    ring[2].insert(1, dict(ring[2][0], to=0))  # the same count, a wrong peer
    with pytest.raises(AssertionError):
        _assert_paired(dict(enumerate(ring)))
