"""Plain PyTorch attention in the test's dtype (float64 for references): no library code."""

from __future__ import annotations

import torch


def visible(seq_len: int, causal: bool, window: int | None) -> torch.Tensor:
    """(S, S) bool: query i sees key j iff i - window < j (and j <= i when causal)."""
    i = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool)
    if causal:
        mask &= j <= i
    if window is not None:
        mask &= j > i - window
    return mask


def attention(q, k, v, causal: bool = True, window: int | None = None, scale: float | None = None, doc_ids=None):
    """q (B, S, H, D), k/v (B, S, H_kv, D) -> (B, S, H, D). doc_ids (B, S): the document of each
    token; a query then sees only keys of its own document (block-diagonal)."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    mask = visible(q.shape[1], causal, window)[None]  # (1, S, S)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])  # (B, S, S)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)


def doc_ids_from_lengths(lengths_per_row: list[list[int]]) -> torch.Tensor:
    """(B, S) document index of each token, from each row's document lengths."""
    return torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in lengths_per_row])


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the error relative to the tensor's scale."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def rms_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).pow(2).mean().sqrt().item()
