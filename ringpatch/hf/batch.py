"""shard_batch: from the full-sequence batch every rank holds to this rank's part.

Labels are shifted on the full sequence first (so the token after a rank's last token is
still the right target), right padding becomes ignored labels, the length is padded to a
multiple of the layout's chunk count, position_ids are built, then each tensor is cut with
ringpatch.shard.

Packed documents (documents.py: position_ids that restart at 0, cu_seq_lens_q/k or seq_idx)
are kept apart: the last token of each document predicts nothing, each token's position is
its offset in its own document, and `ring_cu_seqlens` (the boundaries of the whole padded
batch, as ring_attention takes them) travels with the local batch to every attention layer.
"""

from __future__ import annotations

import torch

from ringpatch.attention.comm import agree, resolve_group
from ringpatch.attention.documents import positions_in_documents
from ringpatch.attention.layout import DEFAULT_LAYOUT, Layout, check_layout, num_chunks, shard
from ringpatch.errors import BadType, BadValue
from ringpatch.hf.documents import FLATTENING_KEYS, document_starts

IGNORE_INDEX = -100
KEYS = ("input_ids", "labels", "attention_mask", "position_ids")
ROW_KEYS = (*KEYS[1:], "seq_idx")  # (batch, seq_len) like input_ids
CHECKED = (*KEYS, "cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")  # compared across the ranks of the group
DOCUMENTS_KEY = "ring_cu_seqlens"
"""The local batch's key for the document boundaries the patched model's attention reads."""
AGREED_KEY = "ring_agreed"
"""Set by the patched model for its attention calls once the batch is checked across the group
(settings.check_local_batch): each call then skips its own agreement."""


def _check_keys(batch) -> torch.Tensor:
    if not hasattr(batch, "keys"):
        raise BadType(f"batch must be a dict of tensors, got {type(batch).__name__}")
    if "input_ids" not in batch:
        raise BadValue(f"batch has no 'input_ids' (it has {sorted(batch.keys())}); ring attention needs token ids")
    unknown = sorted(set(batch.keys()) - set(KEYS) - set(FLATTENING_KEYS))
    if unknown:
        raise BadValue(f"shard_batch does not know the keys {unknown}; it takes {', '.join(KEYS + FLATTENING_KEYS)}")
    input_ids = batch["input_ids"]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise BadValue(
            f"input_ids must be an integer tensor (batch, seq_len), got {getattr(input_ids, 'shape', input_ids)}"
        )
    for key in ROW_KEYS:
        value = batch.get(key)
        if value is not None and (not isinstance(value, torch.Tensor) or value.shape[-1] != input_ids.shape[1]):
            raise BadValue(
                f"{key} must be a tensor of shape {tuple(input_ids.shape)}, got {getattr(value, 'shape', value)}"
            )
    return input_ids


def _check_right_padding(mask: torch.Tensor) -> None:
    mask = mask.to(torch.int64)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise BadValue("attention_mask must hold only 0 and 1")
    bad = (mask[:, 1:] > mask[:, :-1]).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise BadValue(
            f"attention_mask rows {bad[:8]} have left or inner padding; ring attention takes right padding only: "
            "set tokenizer.padding_side = 'right' (or pack sequences without padding)"
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
    parts += [
        _checksum(torch.as_tensor(batch[k])) if batch.get(k) is not None else input_ids.new_tensor(-1) for k in CHECKED
    ]
    rows = agree(None, parts, group, sp_size, input_ids.device)
    if len(set(rows)) > 1:
        differ = [CHECKED[i - 1] if i else "shape" for i in range(len(rows[0])) if len({r[i] for r in rows}) > 1]
        raise BadValue(
            f"the ranks of the sequence-parallel group hold different batches (differing: {differ}); every rank of "
            "one group must load the same full sample, e.g. a sampler seeded by the data-parallel index only"
        )


def shift_and_pad(input_ids, labels, attention_mask, chunks: int, pad_token_id: int, starts=None):
    """Shifted labels (pads and document ends ignored) and both tensors padded to a multiple of `chunks`."""
    b, seq = input_ids.shape
    shifted = None
    if labels is not None:
        labels = labels.clone()
        if attention_mask is not None:
            labels[attention_mask == 0] = IGNORE_INDEX
        shifted = torch.cat([labels[:, 1:], labels.new_full((b, 1), IGNORE_INDEX)], dim=1)
        for row, row_starts in enumerate(starts or ()):
            shifted[row, [s - 1 for s in row_starts[1:]]] = IGNORE_INDEX  # a document's last token: no target
    pad = -seq % chunks
    if pad:
        input_ids = torch.cat([input_ids, input_ids.new_full((b, pad), pad_token_id)], dim=1)
        if shifted is not None:
            shifted = torch.cat([shifted, shifted.new_full((b, pad), IGNORE_INDEX)], dim=1)
    return input_ids, shifted


def _padded_documents(starts: list[list[int]], mask, seq: int, padded: int) -> list[tuple[int, ...]]:
    """Each row's document starts over the padded length: padding (the mask's and the layout's)
    is a document of its own, so no real token's attention changes."""
    rows = []
    for b, row in enumerate(starts):
        real = int(mask[b].sum()) if mask is not None else seq
        row = [s for s in row if s < real] + ([real] if real < padded else [])
        rows.append(tuple(row))
    return rows


def cu_seqlens_of(rows: list[tuple[int, ...]], seq: int, device=None) -> torch.Tensor:
    """The rows' boundaries laid end to end: [0, ..., len(rows) * seq]."""
    bounds = [b * seq + s for b, row in enumerate(rows) for s in row] + [len(rows) * seq]
    return torch.tensor(bounds, dtype=torch.int64, device=device)


def shard_batch(batch, group=None, layout: Layout = DEFAULT_LAYOUT, pad_token_id: int = 0) -> dict:
    """This rank's part of a full-sequence causal-LM batch that every rank of `group` holds.

    Takes input_ids (B, S) and optional labels (HF convention: unshifted, -100 ignored),
    right-padding attention_mask, and position_ids (0..S-1, or restarting at 0 at each packed
    document; cu_seq_lens_q/k, max_length_q/k and seq_idx from padding-free collators say the
    same). Returns input_ids and position_ids (global, or each token's offset in its document),
    with labels: labels/shift_labels (shifted, local) and num_items_in_batch (the global count
    of predicted tokens, for the loss); with packed documents: ring_cu_seqlens."""
    check_layout(layout)
    input_ids = _check_keys(batch)
    given, (group, sp_size, _) = group, resolve_group(group)
    mask, labels = batch.get("attention_mask"), batch.get("labels")
    if mask is not None:
        _check_right_padding(mask)
    starts = document_starts(batch, input_ids.shape[1])
    _check_same_across_ranks(batch, group, sp_size)
    seq = input_ids.shape[1]
    input_ids, shifted = shift_and_pad(input_ids, labels, mask, num_chunks(layout, sp_size), pad_token_id, starts)
    b, padded = input_ids.shape
    position_ids = torch.arange(padded, device=input_ids.device).expand(b, padded)
    cu_seqlens = None
    if starts is not None and any(len(row) > 1 for row in starts):
        rows = _padded_documents(starts, mask, seq, padded)
        cu_seqlens = cu_seqlens_of(rows, padded, input_ids.device)
        position_ids = torch.stack([positions_in_documents(position_ids[r], rows[r]) for r in range(b)])

    def cut(x):
        return shard(x, given, dim=1, layout=layout, cu_seqlens=cu_seqlens)

    local = {"input_ids": cut(input_ids), "position_ids": cut(position_ids)}
    if cu_seqlens is not None:
        local[DOCUMENTS_KEY] = cu_seqlens
    if shifted is not None:
        count = (shifted != IGNORE_INDEX).sum()
        if int(count) == 0:
            raise BadValue("every label of the batch is ignored (-100 or padding): there is nothing to learn from")
        local_labels = cut(shifted)
        local.update(labels=local_labels, shift_labels=local_labels, num_items_in_batch=count)
    return local
