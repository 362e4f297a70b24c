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

MERGE_BYTES = 256 * 2**20
"""Rows are merged in chunks whose float32 copy of the block output takes at most this many bytes,
so the merge needs no temporary the size of the whole output."""


def merge_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Fold block (out_b, lse_b) into the running (out, lse), in place, in float32.

    out - w (out - out_b) is lerp(out, out_b, w) with w = sigmoid(lse_b - lse); logaddexp equals
    lse - log sigmoid(lse - lse_b) and also holds while lse is still -inf (the first block of a row)."""
    # out, out_b: (B, m, H, D); lse, lse_b: (B, m, H); out and lse float32
    b, m, h, d = out.shape
    rows = max(1, MERGE_BYTES // (b * h * d * 4))
    for i in range(0, m, rows):
        part = slice(i, i + rows)
        lse_p, lse_b_p = lse[:, part], lse_b[:, part].float()
        out[:, part].lerp_(out_b[:, part].float(), torch.sigmoid(lse_b_p - lse_p).unsqueeze(-1))
        lse[:, part] = torch.logaddexp(lse_p, lse_b_p)
