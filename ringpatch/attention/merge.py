"""Merging two partial attention results over disjoint key sets through their log-sum-exp.

For one query row, a block b of keys gives out_b = softmax-weighted mean of its values and
lse_b = log sum_j exp(s_j) over its scores. The exact result over the union of two blocks is
the lse-weighted average of the two:

    lse = log(exp(lse_a) + exp(lse_b))
    out = (exp(lse_a) out_a + exp(lse_b) out_b) / exp(lse)
        = out_a - sigmoid(lse_b - lse_a) * (out_a - out_b)

(the online-softmax identity of Milakov & Gimelshein 2018, used block-wise by FlashAttention
and across ranks by ring attention; derived step by step in docs/design.md, "The merge").
The sigmoid form needs no max-subtraction and is exact when one side is empty (lse = -inf).
"""

from __future__ import annotations

import torch


def merge_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Fold block (out_b, lse_b) into the running (out, lse), in place, in float32.

    logaddexp equals lse - log sigmoid(lse - lse_b) and also holds while lse is still -inf
    (the first block of a row)."""
    # out, out_b: (B, m, H, D); lse, lse_b: (B, m, H); out and lse float32
    lse_b = lse_b.float()
    w = torch.sigmoid(lse_b - lse).unsqueeze(-1)
    out.sub_(w * (out - out_b.float()))
    lse.copy_(torch.logaddexp(lse, lse_b))
