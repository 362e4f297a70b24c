"""Every misuse raises ValueError/TypeError naming the values and the fix, on every rank."""

from __future__ import annotations

import pytest
import torch

import ringpatch
from tests.helpers.procs import spawn

pytestmark = pytest.mark.unit


def _qkv(seq=8, heads=4, kv_heads=2, dim=8, batch=1, dtype=torch.float32):
    return (
        torch.randn(batch, seq, heads, dim, dtype=dtype),
        torch.randn(batch, seq, kv_heads, dim, dtype=dtype),
        torch.randn(batch, seq, kv_heads, dim, dtype=dtype),
    )


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (
            lambda: (*_qkv()[:2], _qkv(kv_heads=1)[2]),
            ValueError,
            r"k and v shapes differ: \(1, 8, 2, 8\) vs \(1, 8, 1, 8\)",
        ),
        (lambda: (_qkv(seq=6)[0], *_qkv()[1:]), ValueError, r"must agree in batch, seq_local and head_dim"),
        (lambda: (_qkv(dim=4)[0], *_qkv()[1:]), ValueError, r"must agree in batch, seq_local and head_dim"),
        (lambda: _qkv(heads=3, kv_heads=2), ValueError, r"query heads 3 are not divisible by key/value heads 2"),
        (lambda: (_qkv()[0].double(), *_qkv()[1:]), TypeError, r"dtypes differ: torch.float64, torch.float32"),
        (
            lambda: (_qkv()[0][0], *_qkv()[1:]),
            ValueError,
            r"q must be \(batch, seq_local, heads, head_dim\), got shape \(8, 4, 8\)",
        ),
        (lambda: ([1.0], *_qkv()[1:]), TypeError, r"q must be a torch.Tensor, got list"),
        (lambda: tuple(x.long() for x in _qkv()), TypeError, r"dtype torch.int64 is not supported"),
    ],
)
def test_bad_tensors(make, exc, match):
    _raises(exc, match, ringpatch.ring_attention, *make())


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(layout="striped"), ValueError, r"unknown layout 'striped'; choose one of contiguous, zigzag"),
        (dict(backend="triton"), ValueError, r"unknown backend 'triton'; choose one of auto, torch, flash_attn"),
        (dict(backend="flash_attn"), ValueError, r"flash_attn"),
        (dict(window=0), ValueError, r"window must be None or a positive int .* got 0"),
        (dict(window=2.5), ValueError, r"window must be None or a positive int .* got 2.5"),
        (dict(causal="yes"), TypeError, r"causal must be a bool, got 'yes'"),
        (dict(scale=-1.0), ValueError, r"scale must be None or a positive number, got -1.0"),
    ],
)
def test_bad_options(kwargs, exc, match):
    _raises(exc, match, ringpatch.ring_attention, *_qkv(), **kwargs)


@pytest.mark.parametrize(
    "cu_seqlens, exc, match",
    [
        ([0, 3, 7], ValueError, r"document boundaries \[0, 3, 7\] must run from 0 to 16 \(2 row\(s\) x 8 tokens"),
        ([0, 5, 3, 16], ValueError, r"must increase: position 2 holds 3 after 5"),
        ([0, 5, 5, 16], ValueError, r"must increase: position 2 holds 5 after 5 .* empty documents"),
        ([0, 5, 12, 16], ValueError, r"let a document span two rows \(no boundary at \[8\]\)"),
        (torch.tensor([[0, 8, 16]]), ValueError, r"cu_seqlens must be a 1-D integer tensor"),
        (torch.tensor([0.0, 16.0]), ValueError, r"cu_seqlens must be a 1-D integer tensor .* torch.float32"),
        ("0,16", TypeError, r"cu_seqlens must be a 1-D integer tensor or a sequence of ints, got str"),
    ],
)
def test_bad_document_boundaries(cu_seqlens, exc, match):
    _raises(exc, match, ringpatch.ring_attention, *_qkv(batch=2), cu_seqlens=cu_seqlens)


def test_odd_length_zigzag_single_rank():
    _raises(
        ValueError,
        r"seq_len 7 is not divisible by 2\*sp_size=2 \(zigzag\); pad to 8",
        ringpatch.ring_attention,
        *_qkv(seq=7),
    )


def test_a_kernel_call_past_the_index_edge_is_refused_with_its_numbers():
    """A call whose queries reach the kernel's 32-bit index edge is refused before the ring runs,
    naming the elements and the tokens a rank may hold; one element under runs. At Llama-3-8B's
    heads the edge is 4,194,304 tokens a rank when one K/V head's 4 query heads are a call (Ulysses
    8 alone); the CPU kernel indexes in 64 bits and has none."""
    from ringpatch.attention.kernels import INDEX_EDGE, FlashAttn, TorchCPU
    from ringpatch.attention.ring import check_index_edge
    from ringpatch.errors import BadValue

    _raises(
        BadValue,
        r"attention over 4,194,304 tokens a rank \(micro-batch 1\): one flash_attn call would take 2,147,483,648 "
        r"elements \(4 query heads of 128 for each K/V head\), past the 2,147,483,648 .* fewer than 4,194,304 tokens",
        check_index_edge, (1, 4_194_304, 4, 128), 1, FlashAttn(),
    )  # fmt: skip
    check_index_edge((1, 4_194_303, 4, 128), 1, FlashAttn())
    check_index_edge((1, 702_584, 32, 128), 8, FlashAttn())  # the ring of the one-node recipe: 8 head groups
    check_index_edge((1, 4_194_304, 4, 128), 1, TorchCPU())
    assert FlashAttn.index_edge == INDEX_EDGE == 2**31

    class Edged(TorchCPU):
        index_edge = 8 * 4 * 8  # (1, 8, 4, 8) queries in one call

    _raises(BadValue, r"one torch call would take 256 elements", ringpatch.ring_attention, *_qkv(), backend=Edged())
    Edged.index_edge += 1
    assert ringpatch.ring_attention(*_qkv(), backend=Edged()).shape == (1, 8, 4, 8)


def test_shard_length_not_divisible():
    _raises(
        ValueError,
        r"seq_len 9 is not divisible by 2\*sp_size=2 \(zigzag\); pad to 10",
        ringpatch.shard,
        torch.zeros(1, 9),
    )
    _raises(ValueError, r"unknown layout 'x'", ringpatch.shard, torch.zeros(1, 8), layout="x")


def _check_distributed_errors(rank, world):
    # local lengths that differ across ranks: every rank raises, none waits in the ring
    q, k, v = _qkv(seq=8 if rank == 0 else 10)
    _raises(
        ValueError,
        r"ranks hold different local blocks \(rank 0: q \(1, 8, 4, 8\).*rank 1: q \(1, 10, 4, 8\)",
        ringpatch.ring_attention,
        q,
        k,
        v,
    )
    # dtypes that differ across ranks
    dtype = torch.float32 if rank == 0 else torch.float64
    _raises(ValueError, r"ranks hold different local blocks", ringpatch.ring_attention, *_qkv(dtype=dtype))
    # a global length the layout cannot cut: 3 tokens per rank, zigzag needs 2 chunks per rank
    _raises(
        ValueError,
        rf"seq_len {3 * world} is not divisible by 2\*sp_size={2 * world} \(zigzag\); pad to {4 * world}",
        ringpatch.ring_attention,
        *_qkv(seq=3),
    )
    # a misuse on one rank only: that rank gets its own error, the others are told, nobody hangs
    q, k, v = _qkv(heads=3 if rank == 1 else 4)
    if rank == 1:
        _raises(ValueError, r"query heads 3 are not divisible by key/value heads 2", ringpatch.ring_attention, q, k, v)
    else:
        _raises(ValueError, r"rejected on rank\(s\) \[1\]", ringpatch.ring_attention, q, k, v)
    # document boundaries that differ across ranks: every rank raises
    bounds = [0, 4, 16, 32] if rank == 0 else [0, 5, 16, 32]  # 2 rows of 8 local tokens x 2 ranks
    _raises(
        ValueError,
        r"pass different document boundaries \(rank\(s\) \[1\] differ from rank 0\)",
        ringpatch.ring_attention,
        *_qkv(batch=2),
        cu_seqlens=bounds,
    )
    # boundaries wrong on one rank only: its own error there, the others told
    bounds = [0, 4, 16, 32] if rank == 0 else [0, 4, 16, 31]
    match = r"rejected on rank\(s\) \[1\]" if rank == 0 else r"must run from 0 to 32"
    _raises(ValueError, match, ringpatch.ring_attention, *_qkv(batch=2), cu_seqlens=bounds)
    # the group still works afterwards
    out = ringpatch.ring_attention(*_qkv())
    assert out.shape == (1, 8, 4, 8)


@pytest.mark.multiprocess
def test_distributed_misuse_raises_on_every_rank():
    spawn(_check_distributed_errors, 2)


def _check_ulysses_errors(rank, world):
    import torch.distributed as dist

    _raises(
        ValueError,
        r"ulysses=3 does not divide the 4 sequence-parallel ranks; choose ulysses among \[1, 2, 4\]",
        ringpatch.ulysses_ring_group,
        3,
    )
    _raises(
        ValueError,
        r"the ranks asked for different ulysses degrees \[1, 2\]",
        ringpatch.ulysses_ring_group,
        2 if rank < 2 else 1,
    )
    # a degree refused on one rank only: that rank's own error, the others told, nobody waits
    match = r"ulysses=3 does not divide" if rank == 0 else r"refused on rank\(s\) \[0\]: ulysses=3 does not divide"
    _raises(ValueError, match, ringpatch.ulysses_ring_group, 3 if rank == 0 else 2)
    overlapping = [dist.new_group(r) for r in ([0, 1, 2], [1, 2, 3])]
    _raises(
        ValueError,
        r"sequence groups that overlap without being equal \(\[0, 1, 2\] and \[1, 2, 3\]\)",
        ringpatch.ulysses_ring_group,
        1,
        group=overlapping[0] if rank == 0 else overlapping[1],
    )
    group = ringpatch.ulysses_ring_group(4)
    # heads that U does not split, K/V heads that neither divide U nor are divided by it
    q, k, v = _qkv(seq=4, heads=6, kv_heads=3)
    _raises(ValueError, r"ulysses=4 does not divide the 6 query heads", ringpatch.ring_attention, q, k, v, group=group)
    q, k, v = _qkv(seq=4, heads=12, kv_heads=3)
    _raises(
        ValueError, r"ulysses=4 neither divides the 3 key/value heads", ringpatch.ring_attention, q, k, v, group=group
    )
    out = ringpatch.ring_attention(*_qkv(seq=4, heads=8, kv_heads=2), group=group)  # K/V repeated twice
    assert out.shape == (1, 4, 8, 8)


@pytest.mark.multiprocess
def test_ulysses_misuse_raises_on_every_rank():
    spawn(_check_ulysses_errors, 4)
