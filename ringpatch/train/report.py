"""A run's report: run_dir/report/summary.json and plots of loss, tokens/s, MFU and memory
against step, from metrics.jsonl, so for the whole run across stops and restarts (a resumed run
drops the records past its checkpoint and writes them again). The trainer writes it at the end,
when it stops on request and at --max-steps; `ringpatch report RUN_DIR` writes it at any time.
"""

from __future__ import annotations

import json
from pathlib import Path

from ringpatch.errors import Missing
from ringpatch.evaluate.report import pyplot
from ringpatch.train.metrics import read_records
from ringpatch.train.telemetry import PHASES

PLOTS = {  # file: (title, y label, [(field, label)])
    "loss.png": ("training loss", "loss", [("loss", "loss")]),
    "tokens_per_s.png": ("throughput", "tokens/s per GPU", [("tokens_per_s_per_gpu", "tokens/s per GPU")]),
    "mfu.png": ("model FLOPs utilisation", "MFU", [("mfu", "MFU")]),
    "memory.png": ("peak memory per step", "GiB", [("mem_peak_gib", "measured peak"), ("mem_planned_gib", "plan")]),
}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summary(records: list[dict]) -> dict:
    steps = [r for r in records if "loss" in r]
    events = [r for r in records if "event" in r]

    def field(name: str) -> list[float]:
        return [r[name] for r in steps if isinstance(r.get(name), (int, float))]

    peaks, planned = field("mem_peak_gib"), field("mem_planned_gib")
    ratios = [r["mem_peak_gib"] / r["mem_planned_gib"] for r in steps if r.get("mem_planned_gib")]
    start = next((r for r in events if r["event"] == "start"), {})
    return {
        "steps": steps[-1]["step"] if steps else 0,
        "loss_first": steps[0]["loss"] if steps else None,
        "loss_last": steps[-1]["loss"] if steps else None,
        "tokens_per_s_per_gpu_mean": _mean(field("tokens_per_s_per_gpu")),
        "mfu_mean": _mean(field("mfu")),
        "peak_tflops": start.get("peak_tflops"),
        "peak_source": start.get("peak_source"),
        "mem_peak_gib_max": max(peaks) if peaks else None,
        "mem_planned_gib_max": max(planned) if planned else None,
        "mem_peak_over_plan_max": max(ratios) if ratios else None,
        "time_s": {p: sum(field(f"time_{p}_s")) for p in PHASES},
        "checkpoints": [{"step": r["step"], "seconds": r["seconds"]} for r in events if r["event"] == "checkpoint"],
        "evals": [r for r in events if r["event"] == "eval"],
        "starts": sum(1 for r in events if r["event"] == "start"),
        "restarts": [r["restart"] for r in events if r["event"] == "start" and "restart" in r],
        "stops": [{"step": r["step"], "reason": r["reason"]} for r in events if r["event"] == "stopped"],
        "slowest_ranks": sorted({r["slowest_rank"] for r in steps if "slowest_rank" in r}),
    }


def write_report(run_dir: str | Path) -> Path:
    """run_dir/report: summary.json and the plots; returns the folder."""
    plt = pyplot()

    run_dir = Path(run_dir)
    records = read_records(run_dir)
    if not records:
        raise Missing(
            f"{run_dir / 'metrics.jsonl'} does not exist or is empty: give the run_dir of a run that has taken a step"
        )
    folder = run_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary(records), indent=1) + "\n")
    steps = [r for r in records if "loss" in r]
    for name, (title, ylabel, series) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in series:
            points = [(r["step"], r[key]) for r in steps if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points, strict=True), label=label, marker="." if len(points) < 50 else None)
        for r in records:  # where the run stopped or was restarted
            if r.get("event") == "start" and r.get("step"):
                ax.axvline(r["step"], color="grey", linestyle=":", linewidth=1)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        fig.savefig(folder / name, dpi=80)
        plt.close(fig)
    return folder
