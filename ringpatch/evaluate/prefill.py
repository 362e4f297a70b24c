"""Ring prefill: score chosen positions of prompts longer than one device holds.

A long prompt is prefilled by ring attention across the ranks of a group (forward only, no
gradients); the model's head runs only at the positions that are scored, on the rank that
holds them, and the scores are summed over the group. So a length that does not fit one
device still evaluates, and every rank ends with the same numbers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ringpatch.attention.comm import resolve_group
from ringpatch.attention.layout import Layout, local_positions
from ringpatch.parallel import ParallelDims


def check_lengths(lengths, layout: Layout, ring_size: int, max_tokens_per_rank: int) -> None:
    """Refuse, before any model loads, a length the ring cannot cut or its ranks cannot hold."""
    chunks = ParallelDims(ring_size, sp=ring_size, layout=layout).seq_len_divisor
    for n in lengths:
        if n % chunks:
            raise ValueError(
                f"evaluation length {n} is not divisible by the {layout} layout's {chunks} chunks over {ring_size} "
                f"ranks; use {n // chunks * chunks} or {-(-n // chunks) * chunks}"
            )
        if n // ring_size > max_tokens_per_rank:
            raise ValueError(
                f"evaluation length {n} puts {n // ring_size} tokens on each of {ring_size} ranks, over "
                f"eval.max_tokens_per_rank {max_tokens_per_rank}; launch more ranks (at least "
                f"{-(-n // max_tokens_per_rank)}) or raise the limit if memory allows"
            )


@torch.no_grad()
def ring_prefill_scores(model, ids: torch.Tensor, scored: torch.Tensor, group=None, layout: Layout = "zigzag"):
    """Next-token scores of a ring-patched causal LM at chosen positions of full sequences.

    ids: (B, S) the same on every rank of `group`; scored: (K,) positions p whose prediction of
    ids[:, p + 1] is wanted. Returns (nll, correct), each (B, K) float32: the negative
    log-likelihood of the true next token and whether it is the argmax (greedy decoding would
    produce it), equal on every rank."""
    group, sp_size, sp_rank = resolve_group(group)
    batch, seq = ids.shape
    pos = local_positions(layout, seq, sp_size, sp_rank, device=ids.device)  # (S_local,) global positions
    local_ids = ids[:, pos]
    where = {p: i for i, p in enumerate(pos.tolist())}
    mine = [(k, where[p]) for k, p in enumerate(scored.tolist()) if p in where]  # (score slot, local index)
    keep = torch.tensor([i for _, i in mine], dtype=torch.long, device=ids.device)
    out = model(input_ids=local_ids, position_ids=pos[None].expand(batch, -1), logits_to_keep=keep, use_cache=False)
    logits = out.logits.float()  # (B, len(mine), V): only the scored positions this rank holds
    nll = torch.zeros(batch, len(scored), device=ids.device)
    correct = torch.zeros(batch, len(scored), device=ids.device)
    if mine:
        slots = torch.tensor([k for k, _ in mine], device=ids.device)
        targets = ids[:, scored[slots] + 1]  # (B, len(mine))
        nll[:, slots] = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        correct[:, slots] = (logits.argmax(-1) == targets).float()
    if sp_size > 1:
        dist.all_reduce(nll, group=group)
        dist.all_reduce(correct, group=group)
    return nll, correct
