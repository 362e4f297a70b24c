"""README's figures against the benches' last run: each row of README's figures table that quotes a
bench target states the value (or the range of values) that the bench's latest run checked
(bench/results/targets/<bench>.json, written by each bench). `make bench` runs this last, so a
figure that a new run no longer gives fails there, naming the row: restate it from the run.

    python bench/figures.py          # exit 1 when a figure is not what the last run printed
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.targets import RESULTS  # noqa: E402

FIGURES = (  # (the start of README's row, the target whose values it states, "value" or "range", where: None = all)
    ("ring vs monolithic attention", "attention.ring_vs_monolithic", "range", "S=32768"),
    ("peak memory per rank, 2 ranks vs 1 process", "model.memory_ratio", "value", "S=32768"),
    ("plan / simulated peak, five cluster recipes", "simulate.planned_vs_simulated", "value", None),
)
NUMBER = r"\d+\.\d+"


def figure_cell(readme: str, start: str) -> str | None:
    """The figure column of README's figures row that starts with `start`."""
    for line in readme.splitlines():
        if line.startswith(f"| {start}"):
            return line.split("|")[2].strip()
    return None


def check(readme: str, results: Path = RESULTS) -> list[str]:
    """One line per figure: 'ok ...' or 'WRONG ...' (or 'MISSING ...' when there is no row or run)."""
    lines = []
    for start, target, how, where in FIGURES:
        cell = figure_cell(readme, start)
        path = results / f"{target.split('.')[0]}.json"
        if cell is None or not path.is_file():
            what = f"README has no row '{start}'" if cell is None else f"no results: run python bench/{path.stem}.py"
            lines.append(f"MISSING {target}: {what}")
            continue
        checked = json.loads(path.read_text()).get(target, {})
        values = [v for w, v in checked.items() if where is None or w == where]
        numbers = re.findall(NUMBER, cell.split("(target")[0])
        if not values or not numbers:
            lines.append(f"MISSING {target}: {'no values in ' + str(path) if not values else 'no figure in ' + cell!r}")
            continue
        digits = len(numbers[0].split(".")[1])
        printed = sorted({round(v, digits) for v in values})
        if how == "range":
            low, high = float(numbers[0]), float(numbers[1]) if len(numbers) > 1 else float(numbers[0])
            ok = all(low <= v <= high for v in printed)
            stated = f"{numbers[0]}-{numbers[1] if len(numbers) > 1 else numbers[0]}"
        else:
            ok = printed == [float(numbers[0])]
            stated = numbers[0]
        shown = ", ".join(f"{v:.{digits}f}" for v in printed)
        lines.append(f"{'ok' if ok else 'WRONG'} {target}: README says {stated}, the last run printed {shown}")
    return lines


def main() -> int:
    lines = check((ROOT / "README.md").read_text())
    for line in lines:
        print(line)
    bad = [line for line in lines if not line.startswith("ok ")]
    if bad:
        print(f"README figures not what the last bench run printed: {len(bad)}; restate them from the run")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
