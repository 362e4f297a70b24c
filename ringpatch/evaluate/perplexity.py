"""Perplexity vs context length: the loss of the same last tokens seen with longer and longer contexts."""

from __future__ import annotations

import torch

from ringpatch.attention.layout import DEFAULT_LAYOUT, Layout
from ringpatch.data.packing import restart_first_document
from ringpatch.evaluate.prefill import ring_prefill_scores


def perplexity_by_length(
    model,
    sequences: torch.Tensor,
    lengths,
    last_tokens: int,
    group=None,
    layout: Layout = DEFAULT_LAYOUT,
    positions=None,
) -> dict[int, float]:
    """Mean loss of the same last `last_tokens` tokens of each sequence, seen with a context of
    each length (the context ends where the sequence ends). `positions`: the sequences' document
    positions (restarting at 0 per document) to keep documents apart, as training with
    data.document_masking does; a context that starts inside a document starts it afresh."""
    losses = {}
    for n in lengths:
        ctx = sequences[:, -n:]  # (B, n)
        ctx_pos = None if positions is None else restart_first_document(positions[:, -n:])
        scored = torch.arange(n - last_tokens - 1, n - 1, device=ctx.device)
        nll, _ = ring_prefill_scores(model, ctx, scored, group, layout, position_ids=ctx_pos)
        losses[n] = nll.mean().item()
    return losses
