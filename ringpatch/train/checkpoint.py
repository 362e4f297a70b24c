"""Checkpoints of a DeepSpeed run that resume exactly and refuse another recipe's state.

Each checkpoint goes into its own tag folder. DeepSpeed's own `latest` is written by rank 0
before the other ranks are known to have finished their shards, and not atomically, so we
save with save_latest=False and move `latest` ourselves, by an atomic rename, only after a
barrier: a crash mid-write leaves the previous checkpoint as the one resumed. Beside the
tag we keep the run's identity (model, layout, grid), read and compared before any weight
is loaded; the client state carries the step and the sampler position.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist

IDENTITY_FILE = "ringpatch_identity.json"


def identity(recipe, world: int) -> dict:
    """What must not change between a checkpoint and the run that resumes it."""
    return {
        "model": recipe.model.name,
        "layout": recipe.parallel.layout,
        "sp": recipe.parallel.sp,
        "tp": recipe.parallel.tp,
        "world": world,
        "zero_stage": recipe.zero.stage,
    }


def latest_tag(ckpt_dir: str | Path) -> str | None:
    path = Path(ckpt_dir, "latest")
    return path.read_text().strip() if path.is_file() else None


def check_identity(ckpt_dir: str | Path, tag: str, expected: dict) -> None:
    path = Path(ckpt_dir, tag, IDENTITY_FILE)
    if not path.is_file():
        raise ValueError(f"checkpoint {Path(ckpt_dir, tag)} has no {IDENTITY_FILE}: it was not written by ringpatch")
    saved = json.loads(path.read_text())
    differ = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if differ:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs recipe {b!r}" for k, (a, b) in differ.items())
        raise ValueError(
            f"checkpoint {Path(ckpt_dir, tag)} belongs to another run ({detail}); "
            "point run_dir elsewhere or restore the recipe it was made with"
        )


def save(engine, ckpt_dir: str | Path, step: int, run_identity: dict, client_state: dict) -> str:
    """Write checkpoint `step` on every rank; `latest` moves to it only once it is complete."""
    tag = f"step{step:09d}"
    if dist.get_rank() == 0:
        Path(ckpt_dir, tag).mkdir(parents=True, exist_ok=True)
        Path(ckpt_dir, tag, IDENTITY_FILE).write_text(json.dumps(run_identity, indent=1))
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=dict(client_state, step=step), save_latest=False)
    dist.barrier()  # every rank's shards are on disk
    if dist.get_rank() == 0:
        tmp = Path(ckpt_dir, "latest.tmp")
        tmp.write_text(tag)
        os.replace(tmp, Path(ckpt_dir, "latest"))
    dist.barrier()
    return tag


def load_latest(engine, ckpt_dir: str | Path, run_identity: dict) -> dict | None:
    """Resume from the latest complete checkpoint; None when there is none."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    check_identity(ckpt_dir, tag, run_identity)
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir, tag)}")
    return client_state


def resume(engine, ckpt_dir: str | Path, run_identity: dict, allowed: bool = True) -> dict:
    """The state to start from: the latest complete checkpoint's client state, or step 0.
    With allowed=False (--no-resume) an existing checkpoint is an error, not a silent restart."""
    if latest_tag(ckpt_dir) is not None and not allowed:
        raise ValueError(f"{ckpt_dir} holds a checkpoint and --no-resume was given; choose another run_dir")
    return load_latest(engine, ckpt_dir, run_identity) or {"step": 0}
