"""Evaluation outputs, shared by the tasks: tables on the terminal, CSV/JSON rows, and the checks of
length and depth lists."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ringpatch.errors import BadValue


def write_rows(rows: list[dict], base) -> None:
    """rows as base.csv and base.json."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    with open(base.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    base.with_suffix(".json").write_text(json.dumps(rows, indent=1))


def pyplot():
    """matplotlib.pyplot on the Agg backend: plots go to files, never to a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def format_table(header: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in header]] + [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def check_increasing(name: str, lengths) -> None:
    if list(lengths) != sorted(set(lengths)) or any(n < 1 for n in lengths):
        raise BadValue(f"{name} must be positive and increasing, got {list(lengths)}")


def check_fractions(name: str, depths) -> None:
    bad = [x for x in depths if not 0.0 <= x <= 1.0]
    if bad or not depths:
        raise BadValue(f"{name} must be one or more fractions in [0, 1], got {list(depths)}")
