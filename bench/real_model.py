"""The real model's effective context: what SmolLM2-135M-Instruct (claimed 8,192 tokens) uses of its
context, and what the RoPE rules of recipes/smollm2-16k-cpu.yaml give at 16,384 without training.

Every figure is `ringpatch eval` (ring prefill on 2 CPU processes, float32) as a user runs it:
  1. the model as shipped: perplexity by length (1K-16K) on the held-out real text, the pass key,
     and all six RULER tasks at 1K, 2K, 4K and 8K;
  2. its 16K variants, the config changed by the trainer's own rule (ringpatch.hf.rope.apply_rope),
     no training: the recipe's NTK-aware base and YaRN (factor 2): perplexity 1K-16K, the pass key
     and RULER at 8K and 16K;
  3. the teacher-forced and the generate scorer side by side on three RULER tasks at 2K, to show
     that they agree on a model that writes its own answers.
Then one table: claimed vs effective length (RULER's mean >= 0.856 at every length up to it) beside
each length's RULER mean, pass key and loss; JSON and each evaluation's own tables, CSV and plots
in bench/results/real-model/.

    make real-model real-text && python bench/real_model.py      # about 2 hours on 2 cores
    python bench/real_model.py --quick                           # 1K and 2K, a task each: minutes
    python bench/real_model.py --extended runs/smollm2-16k/final # the extended model beside the stored runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]

FULL = {
    "base": dict(ppl=[1024, 2048, 4096, 8192, 16384], passkey=[1024, 2048, 4096, 8192, 16384],
                 ruler=[1024, 2048, 4096, 8192], trials=2),
    "rope": dict(ppl=[1024, 2048, 4096, 8192, 16384], passkey=[8192, 16384], ruler=[8192, 16384], trials=1),
    "scorers": dict(length=2048, tasks=["niah_single", "niah_multikey", "vt"], trials=1),
    "tasks": ["all"],
}  # fmt: skip
QUICK = {
    "base": dict(ppl=[1024, 2048], passkey=[1024, 2048], ruler=[1024, 2048], trials=1),
    "rope": dict(ppl=[1024, 2048], passkey=[2048], ruler=[2048], trials=1),
    "scorers": dict(length=1024, tasks=["niah_single"], trials=1),
    "tasks": ["niah_single", "vt"],
}


def rope_variants(folder: Path, recipe, out: Path) -> dict[str, Path]:
    """{label: folder} of the model with its config changed for the recipe's last stage, untrained:
    the recipe's own rule (rope_theta or rope_scaling) and YaRN with factor length / claimed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ringpatch.hf.rope import apply_rope

    stage = recipe.stages[-1]
    claimed = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    rules = {
        f"ntk-{stage.seq_len // 1024}k": dict(rope_theta=stage.rope_theta, rope_scaling=stage.rope_scaling),
        f"yarn-{stage.seq_len // 1024}k": dict(rope_scaling={"rope_type": "yarn", "factor": stage.seq_len / claimed}),
    }
    found = {}
    for label, rule in rules.items():
        target = out / "models" / label
        if not (target / "model.safetensors").is_file():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            apply_rope(model, stage.seq_len, **rule)
            model.save_pretrained(target)
            AutoTokenizer.from_pretrained(folder).save_pretrained(target)
        found[label] = target
    return found


def evaluate(name: str, models: list[Path], flags: list[str], out: Path) -> tuple[dict, float]:
    """`ringpatch eval` on 2 ranks (its progress on this terminal); its JSON results and seconds."""
    folder = out / name
    cmd = [*TORCHRUN, "-m", "ringpatch.evaluate", "--model", *map(str, models), *flags, "--out", str(folder)]
    print(f"\n== {name}: {' '.join(cmd[4:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        sys.exit(f"bench/real_model.py: {name} failed (exit {done.returncode})")
    seconds = time.perf_counter() - started
    found = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}
    return found, seconds


def summary(results: dict) -> list[dict]:
    """Per model: claimed and effective length, and by length the RULER mean, pass key and loss."""
    rows: dict[str, dict] = {}
    for found in results.values():
        for r in found.get("effective_length", []):
            row = rows.setdefault(r["model"], {"model": r["model"], "by_length": {}})
            row.update(claimed=r["claimed_length"], effective=r["effective_length"])
            for n, v in r["mean_by_length"].items():
                row["by_length"].setdefault(int(n), {})["ruler"] = v
        for r in found.get("perplexity", []):
            row = rows.setdefault(r["model"], {"model": r["model"], "by_length": {}})
            row["by_length"].setdefault(r["length"], {})["loss"] = r["loss"]
        cells: dict[tuple[str, int], list[float]] = {}
        for r in found.get("passkey", []):
            cells.setdefault((r["model"], r["length"]), []).append(r["accuracy"])
        for (model, n), values in cells.items():
            row = rows.setdefault(model, {"model": model, "by_length": {}})
            row["by_length"].setdefault(n, {})["passkey"] = sum(values) / len(values)
    return list(rows.values())


def print_summary(rows: list[dict]) -> None:
    from ringpatch.evaluate.report import format_table

    lengths = sorted({n for r in rows for n in r["by_length"]})
    print("\nclaimed vs effective length (RULER mean >= 0.856 at every length up to it); by length: RULER mean / "
          "pass key / loss of the last tokens (nats), '-' where not measured")  # fmt: skip

    def cell(values: dict) -> str:
        return " / ".join(f"{values[k]:.2f}" if k in values else "-" for k in ("ruler", "passkey", "loss"))

    print(format_table(["model", "claimed", "effective", *lengths],
                       [[r["model"], r.get("claimed", "-"), r.get("effective") or "none",
                         *(cell(r["by_length"].get(n, {})) for n in lengths)] for r in rows]))  # fmt: skip


def print_scorers(teacher: dict, generate: dict) -> None:
    from ringpatch.evaluate.report import format_table

    by = {}
    for scorer, found in (("teacher", teacher), ("generate", generate)):
        for r in found["ruler"]:
            by.setdefault((r["task"], r["length"]), {})[scorer] = r["score"]
    print("\nthe two RULER scorers on the same prompts (teacher forcing vs greedy generation)")
    print(format_table(["task", "length", "teacher", "generate"],
                       [[t, n, v.get("teacher"), v.get("generate")] for (t, n), v in sorted(by.items())]))  # fmt: skip


def extended(args, flags: list[str]) -> int:
    """The trained models at the RoPE variants' lengths and tasks, beside the stored runs."""
    stored = json.loads((args.out / "summary.json").read_text())
    found, seconds = evaluate("extended", args.extended, flags, args.out)
    results = {**{k: stored["results"][k] for k in ("base", "rope")}, "extended": found}
    rows = summary(results)
    print_summary(rows)
    print(f"\nwall time: extended {seconds / 60:.1f} min")
    stored["results"]["extended"], stored["seconds"]["extended"], stored["summary"] = found, seconds, rows
    (args.out / "summary.json").write_text(json.dumps(stored, indent=1))
    print(f"wrote {args.out / 'summary.json'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-16k-cpu.yaml"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "real-model")
    parser.add_argument("--quick", action="store_true", help="short lengths and two tasks: checks the bench")
    parser.add_argument("--samples", type=int, default=4, help="held-out sequences for perplexity (default 4)")
    parser.add_argument(
        "--extended",
        nargs="+",
        type=Path,
        help="only evaluate these trained models as the RoPE variants are (lengths, tasks), beside the results "
        "already in --out",
    )
    args = parser.parse_args(argv)
    from ringpatch.data.real_model import check_folder
    from ringpatch.errors import USER_ERRORS
    from ringpatch.plan.recipe import load_recipe

    try:
        recipe = load_recipe(args.recipe)
        folder = check_folder(ROOT / recipe.model.name)
        data = ROOT / recipe.data.eval_source
        if not data.is_file():
            raise FileNotFoundError(f"{data} does not exist (made by `make real-text`)")
    except USER_ERRORS as e:
        print(f"bench/real_model.py: {e}", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    common = ["--data", str(data), "--samples", str(args.samples), "--ruler-tasks", *plan["tasks"]]

    def flags(part: dict) -> list[str]:
        return [*common, "--ppl-lengths", *map(str, part["ppl"]), "--passkey-lengths", *map(str, part["passkey"]),
                "--depths", "0.1", "0.5", "0.9", "--trials", "1", "--ruler-lengths", *map(str, part["ruler"]),
                "--ruler-trials", str(part["trials"])]  # fmt: skip

    if args.extended:
        return extended(args, flags(plan["rope"]))
    results, seconds = {}, {}
    results["base"], seconds["base"] = evaluate("base", [folder], flags(plan["base"]), args.out)
    variants = rope_variants(folder, recipe, args.out)
    results["rope"], seconds["rope"] = evaluate("rope", list(variants.values()), flags(plan["rope"]), args.out)
    scorers = plan["scorers"]
    for scorer in ("teacher", "generate"):
        results[scorer], seconds[scorer] = evaluate(
            scorer, [folder],
            ["--ruler-tasks", *scorers["tasks"], "--ruler-lengths", str(scorers["length"]), "--ruler-trials",
             str(scorers["trials"]), "--ruler-scorer", scorer],
            args.out,
        )  # fmt: skip
    rows = summary({k: results[k] for k in ("base", "rope")})
    print_summary(rows)
    print_scorers(results["teacher"], results["generate"])
    total = time.perf_counter() - started
    print(
        "\nwall time: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
        + f"; total {total / 60:.1f} min"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps({"summary": rows, "seconds": seconds, "results": results,
                                                         "quick": args.quick}, indent=1))  # fmt: skip
    print(f"wrote {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
