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
from ringpatch.attention.documents import positions_in_documents
from ringpatch.attention.layout import DEFAULT_LAYOUT, Layout, local_positions
from ringpatch.attention.ulysses import ulysses_degree
from ringpatch.errors import BadValue
from ringpatch.hf.batch import DOCUMENTS_KEY, cu_seqlens_of
from ringpatch.hf.documents import starts_from_positions
from ringpatch.parallel import ParallelDims


def check_lengths(lengths, layout: Layout, ring_size: int, max_tokens_per_rank: int) -> None:
    """Refuse, before any model loads, a length the ring cannot cut or its ranks cannot hold."""
    chunks = ParallelDims(ring_size, sp=ring_size, layout=layout).seq_len_divisor
    for n in lengths:
        if n % chunks:
            raise BadValue(
                f"evaluation length {n} is not divisible by the {layout} layout's {chunks} chunks over {ring_size} "
                f"ranks; use {n // chunks * chunks} or {-(-n // chunks) * chunks}"
            )
        if n // ring_size > max_tokens_per_rank:
            raise BadValue(
                f"evaluation length {n} puts {n // ring_size} tokens on each of {ring_size} ranks, over "
                f"eval.max_tokens_per_rank {max_tokens_per_rank}; launch more ranks (at least "
                f"{-(-n // max_tokens_per_rank)}) or raise the limit if memory allows"
            )


@torch.no_grad()
def ring_prefill_scores(
    model,
    ids: torch.Tensor,
    scored: torch.Tensor,
    group=None,
    layout: Layout = DEFAULT_LAYOUT,
    position_ids=None,
    predicted: bool = False,
):
    """Next-token scores of a ring-patched causal LM at chosen positions of full sequences.

    ids: (B, S) the same on every rank of `group`; scored: (K,) positions p whose prediction of
    ids[:, p + 1] is wanted; position_ids: (B, S) restarting at 0 at each packed document (None:
    one sequence per row), so documents stay apart as in training. Returns (nll, correct), each
    (B, K) float32: the negative log-likelihood of the true next token and whether it is the
    argmax (greedy decoding would produce it), equal on every rank. predicted=True adds a third,
    (B, K) long: the argmax token itself."""
    ulysses = ulysses_degree(group)
    group, sp_size, sp_rank = resolve_group(group)
    place = (sp_size, sp_rank, ulysses)
    nll = torch.zeros(ids.shape[0], len(scored), device=ids.device)
    correct = torch.zeros_like(nll)
    argmax = torch.zeros(nll.shape, dtype=torch.long, device=ids.device)
    for rows, docs in _row_runs(ids.shape[0], position_ids):
        _score(model, ids[rows], scored, (nll[rows], correct[rows], argmax[rows]), place, layout, docs)
    if sp_size > 1:  # each slot is filled on the one rank that holds its position, zero elsewhere
        dist.all_reduce(nll, group=group)
        dist.all_reduce(correct, group=group)
        if predicted:
            dist.all_reduce(argmax, group=group)
    return (nll, correct, argmax) if predicted else (nll, correct)


def _row_runs(batch: int, position_ids) -> list[tuple[slice, tuple[int, ...] | None]]:
    """Runs of neighbouring rows with the same documents, as (rows, document starts or None)."""
    if position_ids is None:
        return [(slice(None), None)]
    starts = [tuple(row) if len(row) > 1 else None for row in starts_from_positions(position_ids)]
    runs, first = [], 0
    for b in range(1, batch + 1):
        if b == batch or starts[b] != starts[first]:
            runs.append((slice(first, b), starts[first]))
            first = b
    return runs


def _score(model, ids, scored, into, place: tuple[int, int, int], layout: Layout, docs) -> None:
    """Score rows that share one placement into this rank's slots of `into` = (nll, correct, argmax).
    place: (sp_size, sp_rank, ulysses)."""
    batch, seq = ids.shape
    sp_size, sp_rank, ulysses = place
    pos = local_positions(layout, seq, sp_size, sp_rank, ids.device, docs, ulysses)  # (S_local,) global
    where = {p: i for i, p in enumerate(pos.tolist())}
    mine = [(k, where[p]) for k, p in enumerate(scored.tolist()) if p in where]  # (score slot, local index)
    keep = torch.tensor([i for _, i in mine], dtype=torch.long, device=ids.device)
    extra = {}
    if docs is not None:  # the rows' boundaries laid end to end, as shard_batch sends them
        extra[DOCUMENTS_KEY] = cu_seqlens_of([docs] * batch, seq)
    rope = positions_in_documents(pos, docs)[None].expand(batch, -1)
    out = model(input_ids=ids[:, pos], position_ids=rope, logits_to_keep=keep, use_cache=False, **extra)
    logits = out.logits.float()  # (B, len(mine), V): only the scored positions this rank holds
    if mine:
        nll, correct, argmax = into
        slots = torch.tensor([k for k, _ in mine], device=ids.device)
        targets = ids[:, scored[slots] + 1]  # (B, len(mine))
        nll[:, slots] = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        argmax[:, slots] = logits.argmax(-1)
        correct[:, slots] = (argmax[:, slots] == targets).float()
