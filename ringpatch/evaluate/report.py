"""Evaluation outputs: tables on the terminal, CSV/JSON rows, and plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from ringpatch.data.tasks import DIGITS
from ringpatch.evaluate.ruler import effective_length, task_means


def write_rows(rows: list[dict], base) -> None:
    """rows as base.csv and base.json."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    with open(base.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    base.with_suffix(".json").write_text(json.dumps(rows, indent=1))


def format_table(header: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in header]] + [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def plot_perplexity(losses: dict[str, dict[int, float]], path, trained: dict[str, int] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, by_length in losses.items():
        ax.plot(list(by_length), list(by_length.values()), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("loss of the last tokens (nats)")
    ax.set_title("Perplexity vs context length")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_passkey(accuracy: dict[str, dict[tuple[int, float], float]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(accuracy), figsize=(4.6 * len(accuracy) + 1, 3.8), squeeze=False, layout="constrained"
    )
    for ax, (label, cells) in zip(axes[0], accuracy.items(), strict=True):
        lengths = sorted({n for n, _ in cells})
        depths = sorted({d for _, d in cells})
        grid = [[cells[(n, d)] for n in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("key depth")
        ax.set_title(f"passkey: {label}")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ruler(ruler: dict[str, dict], path) -> None:
    """One heatmap per model: tasks (and their mean) by length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ruler), figsize=(4.8 * len(ruler) + 1, 4.2), squeeze=False, layout="constrained")
    for ax, (label, result) in zip(axes[0], ruler.items(), strict=True):
        scores = result["scores"]
        tasks = list(dict.fromkeys(t for t, _ in scores))
        lengths = sorted({n for _, n in scores})
        means = task_means(scores)
        grid = [[scores[(t, n)] for n in lengths] for t in tasks] + [[means[n] for n in lengths]]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(tasks) + 1), [*tasks, "mean"])
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(f"{label}: effective {result['effective'] or 'none'} (claimed {result['claimed']})", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="score")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_ruler(ruler: dict[str, dict], spec, out: Path) -> None:
    """The task x length table and the effective length of each model, then the models side by
    side; ruler.{csv,json,png} and effective_length.json."""
    rows, summary = [], []
    for label, result in ruler.items():
        scores, means = result["scores"], task_means(result["scores"])
        result["effective"] = effective_length(means, spec.ruler_threshold)
        result["effective_any"] = effective_length(means, spec.ruler_threshold, rule="any")
        tasks = list(dict.fromkeys(t for t, _ in scores))
        lengths = sorted(means)
        cost = ", ".join(f"{n}: {result['seconds'][n]:.1f} s" for n in lengths)
        print(
            f"\nRULER tasks, {label} (score: fraction of expected items "
            + ("found in the greedy generation" if spec.ruler_scorer == "generate" else "produced")
            + f"; {spec.ruler_trials} prompt(s) per "
            f"depth, depths {list(spec.ruler_depths)}"
            + (
                f"; {spec.ruler_value_digits}-digit values, RULER's are {DIGITS}"
                if spec.ruler_value_digits != DIGITS
                else ""
            )
            + f"; cost per length {cost})"
        )
        table = [[t, *(scores[(t, n)] for n in lengths)] for t in tasks] + [["mean", *(means[n] for n in lengths)]]
        print(format_table(["task", *lengths], table))
        rows += [{"model": label, "task": t, "length": n, "score": v} for (t, n), v in scores.items()]
        rows += [{"model": label, "task": "mean", "length": n, "score": v} for n, v in means.items()]
        summary.append({"model": label, "effective_length": result["effective"],
                        "effective_length_any": result["effective_any"], "claimed_length": result["claimed"],
                        "threshold": spec.ruler_threshold, "mean_by_length": means})  # fmt: skip
    differ = any(r["effective_length"] != r["effective_length_any"] for r in summary)
    print(
        f"\neffective length (mean task score >= {spec.ruler_threshold:.3f} at every length up to it"
        + (
            f"; 'any': the longest length scoring >= {spec.ruler_threshold:.3f}, as RULER's tables read"
            if differ
            else ""
        )
        + ") vs claimed"
    )
    lengths = sorted({n for r in summary for n in r["mean_by_length"]})
    print(format_table(
        ["model", "claimed", "effective", *(["any"] if differ else []), *lengths],
        [[r["model"], r["claimed_length"], r["effective_length"] or "none",
          *([r["effective_length_any"] or "none"] if differ else []), *(r["mean_by_length"][n] for n in lengths)]
         for r in summary],
    ))  # fmt: skip
    write_rows(rows, out / "ruler")
    (out / "effective_length.json").write_text(json.dumps(summary, indent=1))
    plot_ruler(ruler, out / "ruler.png")


def report(ppl: dict, passkey: dict, spec, out: Path, ruler: dict | None = None) -> None:
    """Print the tables and write them as CSV, JSON and PNG into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    if ppl:
        labels = list(ppl)
        print(f"\nloss of the last {spec.ppl_tokens} tokens (nats; perplexity = e^loss) by context length")
        print(format_table(["length", *labels], [[n, *(ppl[m][n] for m in labels)] for n in spec.ppl_lengths]))
        write_rows(
            [
                {"model": m, "length": n, "loss": v, "perplexity": math.exp(v)}
                for m in labels
                for n, v in ppl[m].items()
            ],
            out / "perplexity",
        )
        plot_perplexity(ppl, out / "perplexity.png")
    if passkey:
        for label, cells in passkey.items():
            print(f"\npasskey accuracy, {label} ({spec.passkey_trials} keys per cell; rows: depth, columns: length)")
            rows = [[f"{d:.0%}", *(cells[(n, d)] for n in spec.passkey_lengths)] for d in spec.passkey_depths]
            print(format_table(["depth", *spec.passkey_lengths], rows))
        write_rows(
            [
                {"model": m, "length": n, "depth": d, "accuracy": v}
                for m, cells in passkey.items()
                for (n, d), v in cells.items()
            ],
            out / "passkey",
        )
        plot_passkey(passkey, out / "passkey.png")
    if ruler:
        report_ruler(ruler, spec, out)
    written = [name for name, done in (("perplexity", ppl), ("passkey", passkey), ("ruler", ruler)) if done]
    print(f"\nwrote {', '.join(f'{out}/{n}.{{csv,json,png}}' for n in written)}")
