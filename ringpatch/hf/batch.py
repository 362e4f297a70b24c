"""shard_batch: from the full-sequence batch every rank holds to this rank's part.

Labels are shifted on the full sequence first (so the token after a rank's last token is
still the right target), right padding becomes ignored labels, the length is padded to a
multiple of the layout's chunk count, global position_ids are built, then each tensor is
cut with ringpatch.shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ringpatch.attention.comm import resolve_group
from ringpatch.attention.layout import Layout, check_layout, num_chunks, shard

IGNORE_INDEX = -100
KEYS = ("input_ids", "labels", "attention_mask", "position_ids")


def _check_keys(batch) -> torch.Tensor:
    if not hasattr(batch, "keys"):
        raise TypeError(f"batch must be a dict of tensors, got {type(batch).__name__}")
    if "input_ids" not in batch:
        raise ValueError(f"batch has no 'input_ids' (it has {sorted(batch.keys())}); ring attention needs token ids")
    unknown = sorted(set(batch.keys()) - set(KEYS))
    if unknown:
        raise ValueError(f"shard_batch does not know the keys {unknown}; it takes {', '.join(KEYS)}")
    input_ids = batch["input_ids"]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(
            f"input_ids must be an integer tensor (batch, seq_len), got {getattr(input_ids, 'shape', input_ids)}"
        )
    for key in KEYS[1:]:
        value = batch.get(key)
        if value is not None and (not isinstance(value, torch.Tensor) or value.shape[-1] != input_ids.shape[1]):
            raise ValueError(
                f"{key} must be a tensor of shape {tuple(input_ids.shape)}, got {getattr(value, 'shape', value)}"
            )
    return input_ids


def _check_right_padding(mask: torch.Tensor) -> None:
    mask = mask.to(torch.int64)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    bad = (mask[:, 1:] > mask[:, :-1]).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"attention_mask rows {bad[:8]} have left or inner padding; ring attention takes right padding only: "
            "set tokenizer.padding_side = 'right' (or pack sequences without padding)"
        )


def _check_positions(position_ids: torch.Tensor) -> None:
    expected = torch.arange(position_ids.shape[-1], device=position_ids.device)
    if not torch.equal(position_ids, expected.expand_as(position_ids)):
        raise NotImplementedError(
            "position_ids other than 0..seq_len-1 in every row (offsets or per-document resets of packed sequences) "
            "need document masking, which ring attention does not honour yet; drop position_ids to number tokens "
            "across the packed sequence"
        )


def _checksum(x: torch.Tensor) -> torch.Tensor:
    weights = torch.arange(x.numel(), device=x.device) % 1009 + 1
    return (x.reshape(-1).to(torch.int64) * weights).sum()


def _check_same_across_ranks(batch, group, sp_size: int) -> None:
    """A cheap checksum, so a data-loader bug cannot train the ranks on different sequences."""
    if sp_size == 1:
        return
    input_ids = batch["input_ids"]
    parts = [torch.tensor(input_ids.shape, device=input_ids.device).sum()]
    parts += [_checksum(batch[k]) if batch.get(k) is not None else input_ids.new_tensor(-1) for k in KEYS]
    mine = torch.stack([p.to(torch.int64) for p in parts])
    every = [torch.empty_like(mine) for _ in range(sp_size)]
    dist.all_gather(every, mine, group=group)
    rows = [tuple(t.tolist()) for t in every]
    if len(set(rows)) > 1:
        differ = [KEYS[i - 1] if i else "shape" for i in range(len(rows[0])) if len({r[i] for r in rows}) > 1]
        raise ValueError(
            f"the ranks of the sequence-parallel group hold different batches (differing: {differ}); every rank of "
            "one group must load the same full sample, e.g. a sampler seeded by the data-parallel index only"
        )


def shift_and_pad(input_ids, labels, attention_mask, chunks: int, pad_token_id: int):
    """Shifted labels (pads ignored) and both tensors padded to a multiple of `chunks`."""
    b, seq = input_ids.shape
    shifted = None
    if labels is not None:
        labels = labels.clone()
        if attention_mask is not None:
            labels[attention_mask == 0] = IGNORE_INDEX
        shifted = torch.cat([labels[:, 1:], labels.new_full((b, 1), IGNORE_INDEX)], dim=1)
    pad = -seq % chunks
    if pad:
        input_ids = torch.cat([input_ids, input_ids.new_full((b, pad), pad_token_id)], dim=1)
        if shifted is not None:
            shifted = torch.cat([shifted, shifted.new_full((b, pad), IGNORE_INDEX)], dim=1)
    return input_ids, shifted


def shard_batch(batch, group=None, layout: Layout = "zigzag", pad_token_id: int = 0) -> dict:
    """This rank's part of a full-sequence causal-LM batch that every rank of `group` holds.

    Takes input_ids (B, S) and optional labels (HF convention: unshifted, -100 ignored),
    right-padding attention_mask and position_ids (0..S-1). Returns input_ids,
    position_ids (global), and with labels: labels/shift_labels (shifted, local) and
    num_items_in_batch (the global count of predicted tokens, for the loss)."""
    check_layout(layout)
    input_ids = _check_keys(batch)
    group, sp_size, _ = resolve_group(group)
    mask, labels, positions = batch.get("attention_mask"), batch.get("labels"), batch.get("position_ids")
    if mask is not None:
        _check_right_padding(mask)
    if positions is not None:
        _check_positions(positions)
    _check_same_across_ranks(batch, group, sp_size)
    input_ids, shifted = shift_and_pad(input_ids, labels, mask, num_chunks(layout, sp_size), pad_token_id)
    b, seq = input_ids.shape
    position_ids = torch.arange(seq, device=input_ids.device).expand(b, seq)
    local = {
        "input_ids": shard(input_ids, group, dim=1, layout=layout),
        "position_ids": shard(position_ids, group, dim=1, layout=layout),
    }
    if shifted is not None:
        count = (shifted != IGNORE_INDEX).sum()
        if int(count) == 0:
            raise ValueError("every label of the batch is ignored (-100 or padding): there is nothing to learn from")
        local_labels = shard(shifted, group, dim=1, layout=layout)
        local.update(labels=local_labels, shift_labels=local_labels, num_items_in_batch=count)
    return local
