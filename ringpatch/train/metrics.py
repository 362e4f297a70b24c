"""What a run records: run_dir/metrics.jsonl (one JSON object per line) and wandb, on rank 0."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ringpatch.errors import BadValue


def parse_records(path: Path) -> tuple[list[dict], str | None]:
    """(the records of a metrics.jsonl, its torn last line or None). A process killed while it
    appended leaves part of a line at the end: that line is returned apart, to be named and cut; a
    line that does not parse anywhere else is damage, a ValueError naming the file and the line."""
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                return records, line
            raise BadValue(
                f"{path}, line {number}, is not a JSON record ({line[:60]!r}); the run's log is damaged: restore it "
                "or delete the run_dir"
            ) from None
    return records, None


def read_records(run_dir: str | Path) -> list[dict]:
    """Every record of run_dir/metrics.jsonl, oldest first ([] when there is none yet); a torn last
    line is left out (parse_records)."""
    return parse_records(Path(run_dir) / "metrics.jsonl")[0]


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
        records, torn = parse_records(self.path)
        if torn is not None:
            print(
                f"ringpatch: cut the torn last line of {self.path} (a process stopped while writing it): {torn[:60]!r}"
            )
        kept = [r for r in records if r.get("step", 0) <= step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

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
