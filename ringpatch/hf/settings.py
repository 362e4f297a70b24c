"""What patch_model leaves on a model, and the check that a batch is this rank's part of it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ringpatch.attention.layout import Layout, local_positions, num_chunks


@dataclass(frozen=True)
class RingSettings:
    """Per-model settings, set on every module by patch_model; per-batch metadata travels in the batch."""

    group: object
    layout: Layout
    backend: str
    sp_size: int
    sp_rank: int
    previous_implementation: str | None


def check_local_batch(settings: RingSettings, local: int, position_ids: torch.Tensor) -> None:
    """`local` tokens with `position_ids` must be this rank's part under the model's layout."""
    seq_len = local * settings.sp_size
    ok = seq_len % num_chunks(settings.layout, settings.sp_size) == 0 and position_ids.shape[-1] == local
    if ok:
        expected = local_positions(settings.layout, seq_len, settings.sp_size, settings.sp_rank, position_ids.device)
        ok = torch.equal(position_ids, expected.expand_as(position_ids))
    if not ok:
        raise ValueError(
            f"the batch holds {local} tokens per rank with position_ids {position_ids[0, :4].tolist()}..., which is not "
            f"this rank's part ({settings.layout}, sp_rank {settings.sp_rank} of {settings.sp_size}) of a "
            f"{seq_len}-token sequence; cut the full batch with ringpatch.shard_batch(batch, group, layout)"
        )
