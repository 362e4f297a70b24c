"""The public entry to ring attention: every argument is checked here, once."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ringpatch.attention.comm import agree, resolve_group
from ringpatch.attention.documents import docs_digest, documents_per_row
from ringpatch.attention.kernels import Backend, default_scale, select
from ringpatch.attention.layout import DEFAULT_LAYOUT, Layout, check_layout, check_seq_len
from ringpatch.attention.ring import KeptAttention, RingAttentionFn, RingSpec
from ringpatch.attention.ulysses import UlyssesRing, check_heads, gather_heads, scatter_heads
from ringpatch.errors import BadType, BadValue

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensors(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise BadType(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise BadValue(f"{name} must be (batch, seq_local, heads, head_dim), got shape {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise BadType(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}; cast them to one dtype")
    if q.dtype not in _DTYPES:
        raise BadType(f"dtype {q.dtype} is not supported; use one of {', '.join(map(str, _DTYPES))}")
    if not (q.device == k.device == v.device):
        raise BadValue(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise BadValue(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    (b, s, h, d), (bk, sk, hk, dk) = q.shape, k.shape
    if (b, s, d) != (bk, sk, dk):
        raise BadValue(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree in batch, seq_local and head_dim")
    if h % hk:
        raise BadValue(f"query heads {h} are not divisible by key/value heads {hk} (GQA needs H % H_kv == 0)")


def _check_options(causal, window, scale) -> None:
    if not isinstance(causal, bool):
        raise BadType(f"causal must be a bool, got {causal!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise BadValue(f"window must be None or a positive int (keys j with i - window < j), got {window!r}")
    if scale is not None and (not isinstance(scale, (int, float)) or scale <= 0):
        raise BadValue(f"scale must be None or a positive number, got {scale!r}")


def _agree_across_ranks(q, k, docs, error: Exception | None, group, sp_size: int) -> None:
    """Every rank learns whether every rank's inputs were valid and of one shape, so a misuse
    on one rank raises everywhere instead of leaving the others waiting in the ring."""
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    row = [0] * 7 if error is not None else [*q.shape, k.shape[2], _DTYPES.index(q.dtype), docs_digest(docs)]
    rows = agree(error, row, group, sp_size, device, what="ring_attention inputs")
    if len({found[:6] for found in rows}) > 1:
        shapes = "; ".join(
            f"rank {r}: q {found[:4]} kv_heads {found[4]} {_DTYPES[found[5]]}" for r, found in enumerate(rows)
        )
        raise BadValue(
            f"ranks hold different local blocks ({shapes}); every rank must hold seq_len/sp_size tokens "
            "of the same batch: cut the full sequence with ringpatch.shard or ringpatch.shard_batch"
        )
    if len({found[6] for found in rows}) > 1:
        differ = sorted(r for r, found in enumerate(rows) if found[6] != rows[0][6])
        raise BadValue(
            f"the ranks of the group pass different document boundaries (rank(s) {differ} differ from rank 0); "
            "every rank must pass the boundaries of the whole batch, the same on all ranks"
        )


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group=None,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    layout: Layout = DEFAULT_LAYOUT,
    backend: Backend = "auto",
    cu_seqlens=None,
    keep: KeptAttention | None = None,
    agreed: bool = False,
) -> torch.Tensor:
    """Exact attention over the sequence split across `group` (None: the default group).

    q: (B, S_local, H, D); k, v: (B, S_local, H_kv, D) with H % H_kv == 0. Each rank holds
    its part in `layout` order (see ringpatch.shard). `window=W`: query i sees key j iff
    i - W < j (and j <= i when causal). `cu_seqlens`: document boundaries of packed
    sequences, [0, ..., B * S] over the rows laid end to end in global positions (the same on
    every rank; see attention/documents.py); a query then sees only keys of its own document.
    `group` may be a UlyssesRing (ulysses_ring_group): the heads are then traded for sequence
    inside each Ulysses group and the ring runs over the ring group (ulysses.py); H / U query
    heads must be whole, and H_kv a multiple or a divisor of U.
    `keep`: a KeptAttention slot of this call site, for attention-aware checkpointing: a forward
    with grad enabled leaves its output and lse there, and the recompute of an activation
    checkpoint (inside backward) takes them instead of running the ring again (ring.py).
    `backend`: "auto", "torch", "flash_attn", or a kernel object (kernels.base.Kernel), used as is.
    `agreed`: the caller has already checked, collectively, that every rank of the group passes
    inputs of one shape, dtype and set of document boundaries (a patched model does this once per
    forward, in hf.settings.check_local_batch); the call then skips its own all_gather and the host
    sync that comes with it. Any other check still runs, and raises alike on every rank.
    Returns (B, S_local, H, D) in q's dtype.
    """
    hybrid = group if isinstance(group, UlyssesRing) and group.ulysses > 1 else None
    ring_group = group.ring_group if isinstance(group, UlyssesRing) else None
    group, sp_size, sp_rank = resolve_group(group)
    error, kernel, docs = None, None, None
    try:
        _check_tensors(q, k, v)
        if hybrid is not None:
            check_heads(q.shape[2], k.shape[2], hybrid.ulysses)
        _check_options(causal, window, scale)
        check_layout(layout)
        kernel = select(backend, q)
        docs = documents_per_row(cu_seqlens, q.shape[0], q.shape[1] * sp_size)
    except (TypeError, ValueError) as exc:
        error = exc
    if not agreed:
        _agree_across_ranks(q, k, docs, error, group, sp_size)
    elif error is not None:
        raise error
    seq_len = q.shape[1] * sp_size
    check_seq_len(seq_len, layout, sp_size)
    if ring_group is not None:  # Ulysses x ring: this rank's place in the ring of R = N / U
        group, sp_size, sp_rank = ring_group, dist.get_world_size(ring_group), dist.get_rank(ring_group)
    if hybrid is not None:
        q, k, v = scatter_heads(q, k, v, hybrid)
    spec = RingSpec(
        causal=causal,
        window=window,
        scale=float(scale) if scale is not None else default_scale(q.shape[-1]),
        layout=layout,
        seq_len=seq_len,
        sp_size=sp_size,
        sp_rank=sp_rank,
        kernel=kernel,
        docs=docs,
    )
    out = RingAttentionFn.apply(q, k, v, spec, group, keep if torch.is_grad_enabled() else None)
    return gather_heads(out, hybrid) if hybrid is not None else out
