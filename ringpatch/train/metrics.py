"""What a run records: run_dir/metrics.jsonl (one JSON object per line) and wandb, on rank 0."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


def read_records(run_dir: str | Path) -> list[dict]:
    """Every record of run_dir/metrics.jsonl, oldest first ([] when there is none yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


class RunLog:
    """Appends records to metrics.jsonl and logs their numbers to wandb (online, offline or disabled).

    On resume the records past the resumed step are dropped, since the run writes them again."""

    def __init__(self, run_dir: Path, rank: int, recipe, resumed_step: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.rank = rank
        if rank == 0:
            self._keep_up_to(resumed_step)
        self.wandb = self._start_wandb(run_dir, recipe) if rank == 0 and recipe.wandb != "disabled" else None

    def _keep_up_to(self, step: int) -> None:
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(line + "\n" for line in kept))

    @staticmethod
    def _start_wandb(run_dir: Path, recipe):
        import wandb

        wandb.init(
            project=recipe.wandb_project,
            mode=recipe.wandb,
            dir=str(run_dir),
            name=Path(run_dir).name,
            config=dataclasses.asdict(recipe),
        )
        return wandb

    def write(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            for k, v in record.items():  # a list of numbers (source_share) as one series each
                if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
                    numbers |= {f"{k}/{i}": x for i, x in enumerate(v)}
            self.wandb.log(numbers, step=record.get("step"))

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
