"""The resumable, deterministic sampler that gives each data-parallel rank its own shard."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ringpatch.errors import BadValue


class ResumableSampler:
    """Deterministic shuffled indices for one dp rank, resumable from a position.

    Epoch e uses the permutation seeded by (seed, e); dp rank d reads every dp_size-th index
    of it, so the ranks' shards are disjoint and equally long (the tail that does not divide
    is left out of that epoch). All sp/tp ranks of one dp index get the same indices."""

    def __init__(self, num_samples: int, dp_size: int, dp_rank: int, seed: int = 0):
        if num_samples < dp_size:
            raise BadValue(
                f"{num_samples} packed sequences cannot feed {dp_size} data-parallel ranks; prepare more data "
                "or lower dp (raise sp or tp)"
            )
        if not 0 <= dp_rank < dp_size:
            raise BadValue(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
        self.num_samples, self.dp_size, self.dp_rank, self.seed = num_samples, dp_size, dp_rank, seed
        self.consumed = 0  # samples this rank has taken, over all epochs

    @property
    def per_epoch(self) -> int:
        return self.num_samples // self.dp_size

    def _epoch_indices(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_samples, generator=g)
        return order[self.dp_rank : self.per_epoch * self.dp_size : self.dp_size].tolist()

    def __iter__(self) -> Iterator[int]:
        while True:
            epoch, offset = divmod(self.consumed, self.per_epoch)
            for index in self._epoch_indices(epoch)[offset:]:
                self.consumed += 1
                yield index

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "dp_size": self.dp_size, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        differ = {k: (state.get(k), mine[k]) for k in ("seed", "dp_size", "num_samples") if state.get(k) != mine[k]}
        if differ:
            raise BadValue(f"the checkpoint's sampler does not match this run (checkpoint, now): {differ}")
        self.consumed = int(state["consumed"])
