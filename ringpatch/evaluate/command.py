"""`ringpatch eval` / `python -m ringpatch.evaluate`: perplexity vs length and passkey, models side by side.

A long prompt is prefilled by ring attention across the ranks of a group (forward only, no
gradients); the model's head runs only at the positions that are scored, on the rank that
holds them, and the scores are summed over the group. So a length that does not fit one
device still evaluates, and every rank ends with the same numbers.

    torchrun --nproc_per_node 2 -m ringpatch.evaluate --recipe recipes/tiny-cpu.yaml
    torchrun --nproc_per_node 8 -m ringpatch.evaluate --model runs/x/final --data held_out.jsonl --ppl-lengths 8192 65536
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ringpatch.attention.layout import DEFAULT_LAYOUT, LAYOUTS, Layout
from ringpatch.data.assets import made_by
from ringpatch.data.tokenizer import folder_tokenizer
from ringpatch.errors import USER_ERRORS, BadValue, Missing
from ringpatch.evaluate.prefill import check_lengths
from ringpatch.evaluate.progress import Progress, describe_prefills
from ringpatch.evaluate.spec import EVAL_TASKS, EvalSpec
from ringpatch.flags import Parser
from ringpatch.hf import patch_model
from ringpatch.hf.folder import check_model_folder
from ringpatch.parallel import allocator_settings, launch_int, nccl_settings, start, stop
from ringpatch.plan.preflight import is_local
from ringpatch.plan.recipe import DataSpec, load_recipe


def _load(path: str, group, layout: Layout, device, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return patch_model(model, group=group, layout=layout), folder_tokenizer(path)


def evaluate_models(
    models: dict[str, str], spec, data_spec, out_dir, layout: Layout = DEFAULT_LAYOUT, device=None, dtype=torch.float32
) -> dict:
    """Every task of EVAL_TASKS the spec asks for (perplexity only with data), for each model;
    tables printed by rank 0 and saved as CSV/JSON/PNG in out_dir. Every rank of the default
    group is one ring. Rank 0 prints what the evaluation will prefill before it starts, the time
    of each model's first prefill with the estimate it gives, and a progress bar. Returns
    {task name: {model label: result}}."""
    check_lengths(spec.lengths(), layout, dist.get_world_size(), spec.max_tokens_per_rank)
    tasks = [task for task in EVAL_TASKS if task.enabled(spec, data_spec)]
    prefills = {task.name: task.prefills(spec, data_spec) for task in tasks}
    planned = [run for runs in prefills.values() for run in runs]
    rank0 = dist.get_rank() == 0
    if rank0:
        print(f"ringpatch eval: {len(models)} model(s) x {len(planned)} ring prefills each over "
              f"{dist.get_world_size()} rank(s):\n{describe_prefills(prefills)}", file=sys.stderr, flush=True)  # fmt: skip
    results = {task.name: {} for task in tasks}
    for label, path in models.items():
        model, tokenizer = _load(path, None, layout, device, dtype)
        with Progress(model, planned, dist.get_world_size(), label, enabled=rank0) as progress:
            for task in tasks:
                progress.task = task.name
                results[task.name][label] = task.run(model, tokenizer, spec, data_spec, layout, device)
        del model
    if rank0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for task in tasks:
            task.report(results[task.name], spec, out)
        print(f"\nwrote {', '.join(f'{out}/{task.name}.{{csv,json,png}}' for task in tasks)}")
    dist.barrier()
    return results


def model_labels(paths: list[str]) -> dict[str, str]:
    """{label: path} for model folders given side by side: each folder's name, or as many of its
    last path parts as make the labels distinct (run-a/final, run-b/final), so that no model's
    results overwrite another's; the same folder given twice is refused."""
    resolved = [Path(p).resolve() for p in paths]
    twice = sorted({str(p) for p, r in zip(paths, resolved, strict=True) if resolved.count(r) > 1})
    if twice:
        raise BadValue(f"--model names the same folder more than once ({twice}); give each model once")
    for depth in range(1, max(len(p.parts) for p in resolved) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(labels)) == len(labels):
            return dict(zip(labels, paths, strict=True))
    raise AssertionError("distinct resolved folders always have distinct full paths")


def _spec_and_models(args):
    """The EvalSpec, data and models from --recipe and/or the flags (flags win)."""
    recipe = load_recipe(args.recipe) if args.recipe else None
    spec = recipe.eval if recipe else EvalSpec()
    data_spec = recipe.data if recipe else None
    if args.data:
        if is_local(args.data) and not Path(args.data).exists():
            raise Missing(
                f"--data {args.data} does not exist{made_by(args.data)}; give a json/jsonl/parquet/txt file or folder"
            )
        data_spec = DataSpec(
            source=args.data,
            eval_source=args.data,
            eval_samples=4 if args.samples is None else args.samples,
            document_masking=not args.no_document_masking,
        )
    elif data_spec is not None and args.samples is not None:
        data_spec = dataclasses.replace(data_spec, eval_samples=args.samples)
    changes = {}
    for task in EVAL_TASKS:
        changes |= task.changes(args)
    spec = dataclasses.replace(spec, **changes)
    if data_spec is not None and data_spec.source is None and data_spec.eval_source is None:
        raise BadValue(
            "the recipe trains on a mixture (data.sources) and names no held-out data for perplexity and the RULER "
            "haystack: set data.eval_source in the recipe, or pass --data"
        )
    for task in EVAL_TASKS:  # each task's empty defaults, from the recipe or the tasks before it
        spec = task.complete(spec, recipe, data_spec)
    if args.model:
        models = model_labels(args.model)
        missing = [m for m in args.model if not Path(m, "config.json").is_file()]
        if missing:
            raise Missing(
                f"--model {missing} {'is' if len(missing) == 1 else 'are'} not a model folder (no config.json)"
                f"{''.join(made_by(m) for m in missing)}; "
                "give folders written by save_pretrained, e.g. run_dir/final"
            )
    elif recipe:
        run = Path(recipe.run_dir)
        names = [f"stage{i}" for i in range(len(recipe.stages) - 1)] + ["final"]
        models = {n: str(run / n) for n in names if (run / n / "config.json").is_file()}
        if not models:
            raise Missing(f"{run} holds no exported model yet ({names}); train first or pass --model")
    else:
        raise BadValue("give --recipe (its run's exported models) or --model PATH [PATH ...]")
    for path in models.values():
        check_model_folder(path)  # config.json parses, the weights are whole
    if not any(task.enabled(spec, data_spec) for task in EVAL_TASKS):
        raise BadValue(
            "nothing to evaluate: give --ppl-lengths with --data (perplexity), --passkey-lengths, or --ruler-tasks "
            "with --ruler-lengths, or a --recipe whose eval section names them"
        )
    out = args.out or (str(Path(recipe.run_dir) / "eval") if recipe else "runs/eval")
    return spec, data_spec, models, out, (recipe.parallel.layout if recipe else args.layout)


def build_parser() -> argparse.ArgumentParser:
    """The command's flags: its own, then each task's (EVAL_TASKS)."""
    parser = Parser(prog="ringpatch eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", help="evaluate this recipe's exported models on its eval data and settings")
    parser.add_argument("--model", nargs="+", help="model folders (side by side), e.g. the base and the extended one")
    parser.add_argument("--data", help="held-out documents (json/jsonl/parquet/txt) for perplexity-vs-length")
    parser.add_argument(
        "--samples",
        type=int,
        help="held-out sequences scored for perplexity (default: the recipe's data.eval_samples; with --data, 4)",
    )
    for task in EVAL_TASKS:
        task.add_flags(parser)
    parser.add_argument("--layout", default=DEFAULT_LAYOUT, choices=list(LAYOUTS))
    parser.add_argument(
        "--no-document-masking",
        action="store_true",
        help="with --data: let the held-out documents see each other (as training with data.document_masking: false)",
    )
    parser.add_argument("--out", help="output folder (default: run_dir/eval)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    allocator_settings()  # before anything touches CUDA
    nccl_settings()  # what the plan's reserve assumes, unless set
    args = build_parser().parse_args(argv)
    try:
        spec, data_spec, models, out, layout = _spec_and_models(args)
        ring = launch_int("WORLD_SIZE", 1, minimum=1)  # before any group or model: lengths the ring can take
        check_lengths(spec.lengths(), layout, ring, spec.max_tokens_per_rank)
        # each model's own tokenizer, loaded once before any group starts
        tokenizers = {path: folder_tokenizer(path) for path in dict.fromkeys(models.values())}
        for task in EVAL_TASKS:
            task.check_inputs(spec, data_spec, tokenizers)
    except USER_ERRORS as e:
        print(f"ringpatch eval: {e}", file=sys.stderr)
        return 2
    device = start()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        evaluate_models(models, spec, data_spec, out, layout, device=device, dtype=dtype)
    except USER_ERRORS as e:
        print(f"ringpatch eval (rank {dist.get_rank()}): {e}", file=sys.stderr, flush=True)
        os._exit(1)
    stop()
    return 0
