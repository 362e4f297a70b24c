"""What patch_model leaves on a model, and the check that a batch is this rank's part of it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ringpatch.attention.comm import agree, resolve_group
from ringpatch.attention.documents import boundaries, docs_digest, documents_per_row, positions_in_documents
from ringpatch.attention.layout import LAYOUTS, Layout, local_positions, num_chunks
from ringpatch.attention.ulysses import ulysses_degree
from ringpatch.errors import BadValue


@dataclass(frozen=True)
class RingSettings:
    """Per-model settings, set on every module by patch_model; per-batch metadata travels in the batch."""

    group: object
    """The sequence group: a process group, or a UlyssesRing (ulysses.py) as given to patch_model."""
    layout: Layout
    backend: str
    sp_size: int
    sp_rank: int
    previous_implementation: str | None
    local_logits: bool = False
    """Allow training calls without labels (a loss of your own from this rank's logits, summed
    over the group by you); otherwise such a call raises (see patch.py, _full_loss)."""
    keep_attention: bool = False
    """Attention-aware checkpointing: each attention call keeps its output for the recompute of
    an activation-checkpointed layer, so backward never runs the ring forward again."""

    @property
    def ulysses(self) -> int:
        return ulysses_degree(self.group)


def expected_positions(settings: RingSettings, rows: int, seq_len: int, cu_seqlens=None, device=None) -> torch.Tensor:
    """The position_ids of this rank's part of a `seq_len`-token batch, per row: global positions,
    or with packed documents (cu_seqlens) each token's offset in its own document. # (B, S_local)"""
    docs = documents_per_row(cu_seqlens, rows, seq_len) or (None,) * rows
    return torch.stack(
        [
            positions_in_documents(
                local_positions(
                    settings.layout, seq_len, settings.sp_size, settings.sp_rank, device, docs[b], settings.ulysses
                ),
                docs[b],
            )
            for b in range(rows)
        ]
    )


def _layout_that_matches(settings: RingSettings, rows: int, seq_len: int, bounds, position_ids) -> str | None:
    """Another layout whose part of the batch these positions are (a shard_batch / patch_model mismatch)."""
    for layout in LAYOUTS:
        if layout == settings.layout or seq_len % num_chunks(layout, settings.sp_size):
            continue
        other = dataclasses.replace(settings, layout=layout)
        try:
            expected = expected_positions(other, rows, seq_len, bounds, position_ids.device)
        except ValueError:
            continue
        if torch.equal(position_ids, expected.view_as(position_ids)):
            return layout
    return None


def check_local_batch(settings: RingSettings, local: int, position_ids: torch.Tensor, cu_seqlens=None):
    """`local` tokens with `position_ids` must be this rank's part under the model's layout (and,
    with packed documents, their boundaries `cu_seqlens`), and every rank of the group must hold
    the same batch shape and boundaries.

    Collective over the model's group, once per forward: one all_gather and one host sync (the
    position check rides in it). Every attention call of that forward can then skip its own
    agreement (ring_attention(agreed=True)). Returns the boundaries as a tuple of ints (None
    without documents), for the attention layers to read without touching the device again."""
    group, sp_size, _ = resolve_group(settings.group)
    rows = position_ids.shape[0] if position_ids.dim() == 2 else 1
    seq_len = local * settings.sp_size
    error, matches, bounds, digest = None, 0, None, 0
    try:
        bounds = None if cu_seqlens is None else boundaries(cu_seqlens)
        digest = docs_digest(documents_per_row(bounds, rows, seq_len))
        if seq_len % num_chunks(settings.layout, settings.sp_size) == 0 and position_ids.shape[-1] == local:
            expected = expected_positions(settings, rows, seq_len, bounds, position_ids.device)
            matches = (position_ids == expected.view_as(position_ids)).all()
    except (TypeError, ValueError) as e:
        error = e
    found = agree(error, [matches, rows, local, digest], group, sp_size, position_ids.device, "the batches")
    wrong = [r for r, row in enumerate(found) if not row[0]]
    if wrong:  # every rank is here: they agree on whether the batch was cut for another layout
        other = _layout_that_matches(settings, rows, seq_len, bounds, position_ids)
        index = LAYOUTS.index(other) if other is not None else -1
        if {row[0] for row in agree(None, [index], group, sp_size, position_ids.device)} == {index} and other:
            raise BadValue(
                f"the batch was cut with layout {other!r}, but the model was patched with layout {settings.layout!r}: "
                f"pass the same layout to both (shard_batch(batch, group, layout={settings.layout!r}), or "
                f"patch_model(model, group, layout={other!r}))"
            )
    if not found[settings.sp_rank if sp_size > 1 else 0][0]:
        raise BadValue(
            f"the batch holds {local} tokens per rank with position_ids {position_ids.reshape(-1)[:4].tolist()}..., "
            f"which is not this rank's part ({settings.layout}, sp_rank {settings.sp_rank} of {settings.sp_size}"
            f"{f', ulysses {settings.ulysses}' if settings.ulysses > 1 else ''}) "
            f"of a {seq_len}-token sequence{' with these document boundaries' if bounds else ''}; "
            "cut the full batch with ringpatch.shard_batch(batch, group, layout)"
        )
    wrong = [r for r, row in enumerate(found) if not row[0]]
    if wrong:
        raise BadValue(f"rank(s) {wrong} of the group do not hold their part of the batch; see their error")
    if len({row[1:] for row in found}) > 1:
        shapes = "; ".join(f"rank {r}: {row[1]} x {row[2]} tokens" for r, row in enumerate(found))
        raise BadValue(
            f"the ranks of the group hold different batches ({shapes}"
            f"{', or different document boundaries' if bounds else ''}); every rank of the group must hold its "
            "part of the same batch: cut it with ringpatch.shard_batch(batch, group, layout) on every rank"
        )
    return bounds
