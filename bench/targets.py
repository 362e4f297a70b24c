"""Every benchmark target in one place. Each bench checks its own figures against these (and
exits 1 when one is missed); `make bench` runs them all and names every bench that missed one.
README.md quotes them from here.

A target is (low, high, what): the figure must be >= low and <= high (None: unbounded).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

TARGETS = {
    "attention.ring_vs_monolithic": (None, 1.05, "ring time / monolithic time, zigzag, at every S"),
    "model.time_ratio": (None, 1.10, "patched step time / unpatched"),
    "model.memory_ratio": (None, 0.60, "peak memory per rank, 2 ranks / 1 process"),
    "tiled_mlp.time_ratio": (None, 1.10, "step time with MLP tiles / untiled"),
    "tiled_mlp.peak_ratio": (None, 1.0, "peak memory with MLP tiles / untiled, at the longest S"),
    "checkpointing.keep_vs_full": (None, 0.85, "keep_attention step time / full-layer checkpointing, at 32K"),
    "memory.predicted_vs_measured": (0.80, 1.20, "the plan's activations / a real run's resident peak"),
    "memory.longest_on_vs_off": (2.0, None, "longest S under the budget, features on / off"),
    "simulate.planned_vs_simulated": (0.95, 1.05, "planned / simulated peak, every shipped recipe"),
    "prepare.same_sequences": (1.0, 1.0, "preparations that give num_proc 1's sequences / all"),
}


def rule(name: str) -> str:
    low, high, _ = TARGETS[name]
    if low is not None and high is not None:
        return f"within {low:g} .. {high:g}" if low != high else f"= {low:g}"
    return f">= {low:g}" if low is not None else f"<= {high:g}"


RESULTS = Path(__file__).resolve().parent / "results" / "targets"
"""Each bench's last checked values, one JSON per bench ({target: {where: value}}): what
bench/figures.py holds README's figures to."""


class Verdicts:
    """A bench's checks against TARGETS, printed as they are made; `exit_code` at the end, which
    also writes the checked values to `results` (RESULTS/<bench>.json)."""

    def __init__(self, results: Path = RESULTS):
        self.missed: list[str] = []
        self.values: dict[str, dict[str, float]] = {}
        self.results = results

    def check(self, name: str, value: float, where: str = "") -> bool:
        low, high, what = TARGETS[name]
        ok = math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high)
        self.values.setdefault(name, {})[where] = float(value)
        label = f"{name}{f' ({where})' if where else ''}"
        print(f"target {label}: {value:.3f} {rule(name)}: {'met' if ok else 'MISSED'} ({what})", flush=True)
        if not ok:
            self.missed.append(f"{label} {value:.3f}")
        return ok

    def exit_code(self) -> int:
        for bench in {name.split(".")[0] for name in self.values}:
            self.results.mkdir(parents=True, exist_ok=True)
            mine = {k: v for k, v in self.values.items() if k.split(".")[0] == bench}
            (self.results / f"{bench}.json").write_text(json.dumps(mine, indent=1))
        if self.missed:
            print(f"targets missed: {'; '.join(self.missed)}", flush=True)
        return 1 if self.missed else 0
