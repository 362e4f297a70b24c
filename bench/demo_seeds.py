"""The demo's training and evaluation with several seeds: does its result hold with a margin, or
on one lucky trajectory?

Each seed extends the demo's base model with recipes/tiny-cpu.yaml (the order in which documents
are drawn follows `seed`) into runs/demo-seed{S}, and evaluates the base and the extended model as
`make demo` does; then one table per measure prints every seed side by side, with the worst value
over the seeds (the highest loss, the lowest score), which is what the README may claim.

    python bench/demo_seeds.py                  # seeds 0 1 2, about 4 minutes each on 2 cores
    python bench/demo_seeds.py --seeds 0 1      # fewer
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ringpatch.plan.recipe import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]


def run_seed(recipe: dict, seed: int) -> tuple[Path, float]:
    run_dir = ROOT / "runs" / f"demo-seed{seed}"
    path = ROOT / "runs" / f"demo-seed{seed}.yaml"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time, as `make demo` does
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**recipe, "seed": seed, "run_dir": str(run_dir)}, sort_keys=False))
    started = time.perf_counter()
    env = {**os.environ, "RINGPATCH_OVERSUBSCRIBE": "1"}
    models = ["--model", recipe["model"]["name"], str(run_dir / "final")]  # the base beside the extended model
    for module, extra in (("ringpatch.train", ["--no-resume"]), ("ringpatch.evaluate", models)):
        cmd = [*TORCHRUN, "-m", module, "--recipe", str(path), *extra]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"seed {seed}: {' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return run_dir / "eval", time.perf_counter() - started


def resolved(path: str) -> dict:
    """The recipe's YAML with its model and local data as absolute paths (as load_recipe reads them,
    beside the recipe): the seed recipes are written to runs/, and the model goes to the command line."""
    recipe, loaded = yaml.safe_load(Path(path).read_text()), load_recipe(path)
    recipe["model"]["name"] = str(Path(loaded.model.name).resolve())
    for key in ("source", "eval_source"):
        if recipe["data"].get(key) is not None:
            recipe["data"][key] = str(Path(getattr(loaded.data, key)).resolve())
    for raw, source in zip(recipe["data"].get("sources", []), loaded.data.sources, strict=True):
        if Path(source.source).exists():
            raw["source"] = str(Path(source.source).resolve())
    return recipe


def _load(folder: Path, name: str) -> list[dict]:
    return json.loads((folder / f"{name}.json").read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny-cpu.yaml"))
    args = parser.parse_args(argv)
    recipe = resolved(args.recipe)
    results = {}
    for seed in args.seeds:
        folder, seconds = run_seed(recipe, seed)
        results[seed] = {name: _load(folder, name) for name in ("perplexity", "passkey", "ruler", "effective_length")}
        results[seed]["seconds"] = seconds
        print(f"seed {seed}: trained and evaluated in {seconds:.0f} s", flush=True)

    def table(title: str, rows: dict, worst=min) -> None:
        print(f"\n{title}")
        print(f"{'':>30}" + "".join(f"  seed {s:>2}" for s in args.seeds) + "   worst")
        for label, values in rows.items():
            print(f"{label:>30}" + "".join(f"  {v:7.3f}" for v in values) + f"  {worst(values):6.3f}")

    def per_seed(table_name: str, value: str, **match) -> list[float]:
        """`value` of the one record of `table_name` that matches `match`, in each seed."""
        return [
            next(x[value] for x in results[s][table_name] if all(x[k] == v for k, v in match.items()))
            for s in args.seeds
        ]

    models = list(dict.fromkeys(r["model"] for r in results[args.seeds[0]]["perplexity"]))  # in evaluation order
    for model in models:
        ppl = {
            f"loss at {r['length']}": per_seed("perplexity", "loss", model=model, length=r["length"])
            for r in results[args.seeds[0]]["perplexity"]
            if r["model"] == model
        }
        table(f"{model}: loss of the last tokens by context length (nats)", ppl, worst=max)
        keys = sorted({r["length"] for r in results[args.seeds[0]]["passkey"]})
        passkey = {
            f"passkey at {n} (mean of depths)": [
                sum(x["accuracy"] for x in results[s]["passkey"] if x["model"] == model and x["length"] == n)
                / sum(1 for x in results[s]["passkey"] if x["model"] == model and x["length"] == n)
                for s in args.seeds
            ]
            for n in keys
        }
        table(f"{model}: passkey accuracy", passkey)
        ruler = {
            f"{r['task']} at {r['length']}": per_seed("ruler", "score", model=model, task=r["task"], length=r["length"])
            for r in results[args.seeds[0]]["ruler"]
            if r["model"] == model
        }
        table(f"{model}: RULER task scores", ruler)
        effective = {
            "effective length": [
                float(next(x["effective_length"] for x in results[s]["effective_length"] if x["model"] == model))
                for s in args.seeds
            ]
        }
        table(f"{model}: effective length (0: none)", effective)
    out = ROOT / "bench" / "results" / "demo_seeds.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({str(s): r for s, r in results.items()}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
