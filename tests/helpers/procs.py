"""Real multi-process groups for tests: torch.multiprocessing spawn, gloo, a file store."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, store: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    fn(rank, world_size, *args)
    dist.barrier()  # leave together: a rank tearing down gloo while its peer still runs can hang
    dist.destroy_process_group()


def spawn(fn, world_size: int, *args) -> None:
    """Run fn(rank, world_size, *args) in `world_size` processes joined in a gloo group.

    `fn` must be importable (module level). A failure in any rank fails the caller with
    that rank's traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world_size, os.path.join(tmp, "store"), fn, args), nprocs=world_size, join=True)
