"""`ringpatch` command: init, train, prepare, eval, plan, corpus, recipe, report.

ringpatch init my-run                               # the recipes, launch configs and demo data, to start from

ringpatch train --recipe recipes/tiny-cpu.yaml      # under torchrun / deepspeed / accelerate launch
ringpatch prepare --recipe recipes/llama3-8b-1m.yaml
ringpatch eval --recipe recipes/tiny-cpu.yaml
ringpatch plan --recipe recipes/llama3-8b-1m.yaml --nodes 4 --gpus-per-node 8 [--max-context] [--simulate]
ringpatch corpus --out data/demo
ringpatch recipe --schema                           # every recipe key: type, default, range, description
ringpatch report runs/tiny-cpu                      # summary.json and plots of a run (written at its end too)
"""

from __future__ import annotations

import math
import sys

from ringpatch.errors import BadValue
from ringpatch.flags import Parser

USAGE = __doc__


def prepare(argv: list[str]) -> int:
    parser = Parser(prog="ringpatch prepare", description="tokenise and pack a recipe's data to disk")
    parser.add_argument("--recipe", required=True)
    args = parser.parse_args(argv)
    from ringpatch.data.prepare import prepare_recipe
    from ringpatch.errors import USER_ERRORS
    from ringpatch.plan.preflight import preflight
    from ringpatch.plan.recipe import load_recipe

    try:
        recipe = load_recipe(args.recipe)
        preflight(args.recipe, world=recipe.parallel.sp * recipe.parallel.tp, deep=True)  # the trainer's checks
        folders = prepare_recipe(recipe)
    except USER_ERRORS as e:
        print(f"ringpatch prepare: {e}", file=sys.stderr)
        return 2
    for folder in folders:
        print(f"prepared {folder}")
    return 0


def plan(argv: list[str]) -> int:
    parser = Parser(prog="ringpatch plan", description="print a recipe's validated plan")
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node: GPUs, or CPU processes")
    parser.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="what the run trains on (default cuda): cpu plans CPU processes as the *-cpu recipes run them (dtype auto "
        "is float32 there, the CPU kernel, each process's runtime as its reserve)",
    )
    parser.add_argument(
        "--gpu-memory",
        type=float,
        help="GiB per GPU (or CPU process) the plan must fit (default: 80 on cuda; with --device cpu, this host's "
        "memory shared by --gpus-per-node processes)",
    )
    parser.add_argument("--launch", help="the launch command to print with the plan")
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="torchrun's --max-restarts for the launch, checked against the recipe",
    )
    parser.add_argument(
        "--max-context",
        action="store_true",
        help="also print the longest sequence whose estimate fits --gpu-memory (micro_batch 1, this grid)",
    )
    parser.add_argument(
        "--simulate",
        action="store_true",
        help="also run one rank of the grid through a training step of a stage at its real shape on fake tensors "
        "(no GPU; minutes at 1M tokens) and print it beside the plan",
    )
    parser.add_argument("--stage", type=int, help="the stage --simulate runs (default: the longest)")
    parser.add_argument(
        "--host-memory",
        type=float,
        default=1536.0,
        help="GiB of host memory per node that activation offload may use (default 1536: a 2 TB node, a quarter kept)",
    )
    args = parser.parse_args(argv)
    from ringpatch.errors import USER_ERRORS
    from ringpatch.plan import for_recipe
    from ringpatch.plan.budget import describe, describe_max_context
    from ringpatch.plan.check import check_index_edge, check_memory, host_memory_gib

    try:
        if args.gpu_memory is None:
            args.gpu_memory = 80.0 if args.device == "cuda" else host_memory_gib() / args.gpus_per_node
        if args.nodes < 1 or args.gpus_per_node < 1 or not 0 < args.gpu_memory < math.inf:
            raise BadValue(
                f"--nodes, --gpus-per-node and --gpu-memory must be positive (the memory finite), got {args.nodes}, "
                f"{args.gpus_per_node}, {args.gpu_memory}"
            )
        if not 0 < args.host_memory < math.inf:
            raise BadValue(f"--host-memory must be a positive finite number (GiB per node), got {args.host_memory}")
        # for the device the run trains on, wherever `plan` runs
        p = for_recipe(args.recipe, args.nodes, args.gpus_per_node, args.device)
        if args.max_restarts < 0:
            raise BadValue(f"--max-restarts must be >= 0, got {args.max_restarts}")
        from ringpatch.train.restart import check_restarts

        check_restarts(p.recipe, args.max_restarts)
        if args.simulate:
            from ringpatch.plan.simulate import check_simulable

            check_simulable(p)  # before any work
            stage = args.stage
            if stage is not None and not 0 <= stage < len(p.recipe.stages):
                raise BadValue(f"--stage {stage} is not a stage of {args.recipe} (0..{len(p.recipe.stages) - 1})")
        print(describe(p, args.launch, args.gpus_per_node))
        if args.max_context:
            print(describe_max_context(p, args.gpu_memory, args.gpus_per_node, args.host_memory))
        if args.simulate:
            from ringpatch.plan.budget import stage_budget
            from ringpatch.plan.simulate import describe_simulation, simulate

            sim = simulate(p, stage, kernel=args.device)
            print(describe_simulation(sim, stage_budget(p, sim.stage), p.dims.world, args.gpu_memory))
        what = "GPU" if p.cuda else "CPU process"
        check_index_edge(p)
        check_memory(p, args.gpu_memory, f"a {args.gpu_memory:g} GiB {what} (--gpu-memory)")
    except USER_ERRORS as e:
        print(f"ringpatch plan: {e}", file=sys.stderr)
        return 2
    return 0


def recipe(argv: list[str]) -> int:
    parser = Parser(prog="ringpatch recipe", description="the recipe schema, or check a recipe")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--schema", action="store_true", help="print every key: type, default, range, description")
    group.add_argument("--check", metavar="RECIPE", help="load and validate a recipe file (no model, no data)")
    args = parser.parse_args(argv)
    from ringpatch.errors import USER_ERRORS
    from ringpatch.plan.recipe import Recipe, load_recipe
    from ringpatch.schema import schema_rows

    if args.schema:
        for key, kind, default, rule, doc in schema_rows(Recipe):
            extra = "".join(f"; {x}" for x in (f"default {default}" if default else "", rule) if x)
            print(f"{key}  ({kind}{extra})\n    {doc}")
        return 0
    try:
        load_recipe(args.check)
    except USER_ERRORS as e:
        print(f"ringpatch recipe: {e}", file=sys.stderr)
        return 2
    print(f"{args.check}: valid")
    return 0


def report(argv: list[str]) -> int:
    parser = Parser(
        prog="ringpatch report",
        description="write RUN_DIR/report: summary.json and plots of loss, tokens/s, MFU, memory",
    )
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    from ringpatch.train.report import write_report

    try:
        folder = write_report(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"ringpatch report: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a run folder it cannot write (read-only, full)
        print(f"ringpatch report: cannot write {args.run_dir}/report: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    return 0


def corpus(argv: list[str]) -> int:
    parser = Parser(prog="ringpatch corpus", description="write the demo corpus")
    parser.add_argument("--out", default="data/demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from ringpatch.data.corpus import write_corpus

    print(f"wrote {write_corpus(args.out, seed=args.seed)}")
    return 0


def init(argv: list[str]) -> int:
    parser = Parser(
        prog="ringpatch init",
        description="write the shipped recipes, launch configs (accelerate, DeepSpeed, SLURM), the demo's base model "
        "and the demo corpus into a folder, to run or edit from there",
    )
    parser.add_argument("folder", nargs="?", default=".", help="where to write them (default: this folder)")
    parser.add_argument("--force", action="store_true", help="overwrite files that exist")
    args = parser.parse_args(argv)
    from pathlib import Path

    from ringpatch.data.corpus import write_corpus
    from ringpatch.errors import USER_ERRORS
    from ringpatch.shipped import write_out

    try:
        written = write_out(args.folder, force=args.force)
    except USER_ERRORS as e:
        print(f"ringpatch init: {e}", file=sys.stderr)
        return 2
    demo = Path(args.folder, "data", "demo")
    write_corpus(demo)
    folder = Path(args.folder)
    print(
        f"wrote {len(written)} files under {folder}/ (recipes/, launch/, data/demo-base/) and the demo corpus in "
        f"{demo}/\n  ringpatch plan --recipe {folder / 'recipes' / 'llama3-8b-1m-1node.yaml'} --nodes 1\n"
        f"  torchrun --nproc_per_node 2 -m ringpatch.train --recipe {folder / 'recipes' / 'tiny-cpu.yaml'}\n"
        "a recipe's relative paths are read beside it (model, data, deepspeed); run_dir and cache_dir are relative "
        "to the folder you run in"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("init", "train", "prepare", "eval", "plan", "corpus", "recipe", "report"):
        print(USAGE, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    from ringpatch.train.extras import check

    if problem := check(command):
        print(problem, file=sys.stderr)
        return 2
    if command == "train":
        from ringpatch.train.command import main as train

        return train(rest)
    if command == "eval":
        from ringpatch.evaluate.command import main as evaluate

        return evaluate(rest)
    commands = {"init": init, "prepare": prepare, "plan": plan, "corpus": corpus, "recipe": recipe, "report": report}
    return commands[command](rest)


def entry() -> None:
    """The `ringpatch` console script: train and eval leave without the interpreter's
    finalization once done (ringpatch.parallel.leave)."""
    code = main()
    if len(sys.argv) > 1 and sys.argv[1] in ("train", "eval"):
        from ringpatch.parallel import leave

        leave(code)
    raise SystemExit(code)


if __name__ == "__main__":
    entry()
