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
from ringpatch.data.prepare import prepare_shared
from ringpatch.data.tasks import THRESHOLD
from ringpatch.errors import USER_ERRORS
from ringpatch.evaluate.passkey import CLASSIC, demo_template, passkey_accuracy
from ringpatch.evaluate.perplexity import perplexity_by_length
from ringpatch.evaluate.prefill import check_lengths
from ringpatch.evaluate.report import report
from ringpatch.evaluate.ruler import TASKS, Builder, check_tokenizer, min_length, ruler_scores
from ringpatch.hf import patch_model
from ringpatch.parallel import allocator_settings, launch_int, start, stop
from ringpatch.train.preflight import is_local
from ringpatch.train.recipe import DataSpec, EvalSpec, load_recipe


def _load(path: str, group, layout: Layout, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return patch_model(model, group=group, layout=layout), AutoTokenizer.from_pretrained(path)


def _held_out(data_spec, tokenizer, length: int, count: int, device):
    """(input_ids, document positions or None), each (count, length): held-out packed sequences,
    with their documents kept apart when the data is trained with document masking."""
    source = data_spec.eval_source or data_spec.source
    split = data_spec.eval_split if data_spec.eval_source else data_spec.split
    data = prepare_shared(data_spec, source, split, tokenizer, length, "eval")
    rows = data[: min(count, len(data))]
    positions = rows["doc_position_ids"].to(device) if data_spec.document_masking else None
    return rows["input_ids"].to(device), positions


def _haystack(spec, data_spec, tokenizer, device):
    """The RULER haystack: None (repeated filler) or the held-out data's tokens, rows end to end."""
    if spec.ruler_haystack == "filler":
        return None
    ids, _ = _held_out(data_spec, tokenizer, max(spec.ruler_lengths), data_spec.eval_samples, device)
    return ids.reshape(-1).cpu()


def evaluate_models(
    models: dict[str, str], spec, data_spec, out_dir, layout: Layout = DEFAULT_LAYOUT, device=None, dtype=torch.float32
) -> dict:
    """Perplexity-vs-length (when data is given), passkey and the RULER tasks for each model;
    tables printed by rank 0 and saved as CSV/JSON/PNG in out_dir. Every rank of the default
    group is one ring."""
    ring = dist.get_world_size()
    check_lengths(
        [*spec.ppl_lengths, *spec.passkey_lengths, *spec.ruler_lengths], layout, ring, spec.max_tokens_per_rank
    )
    template = demo_template() if spec.passkey_template == "demo" else CLASSIC
    ppl, passkey, ruler = {}, {}, {}
    for label, path in models.items():
        model, tokenizer = _load(path, None, layout, device, dtype)
        if spec.ruler_tasks:
            scores, seconds = ruler_scores(
                model,
                tokenizer,
                spec.ruler_tasks,
                spec.ruler_lengths,
                spec.ruler_depths,
                spec.ruler_trials,
                None,
                layout,
                haystack=_haystack(spec, data_spec, tokenizer, device),
                device=device,
                digits=spec.ruler_value_digits,
                scorer=spec.ruler_scorer,
                wording=spec.ruler_wording,
            )
            claimed = model.config.max_position_embeddings
            ruler[label] = {"scores": scores, "seconds": seconds, "claimed": claimed}
        if data_spec is not None and spec.ppl_lengths:
            sequences, positions = _held_out(
                data_spec, tokenizer, max(spec.ppl_lengths), data_spec.eval_samples, device
            )
            ppl[label] = perplexity_by_length(
                model, sequences, spec.ppl_lengths, spec.ppl_tokens, None, layout, positions=positions
            )
        if spec.passkey_lengths:
            passkey[label] = passkey_accuracy(
                model,
                tokenizer,
                spec.passkey_lengths,
                spec.passkey_depths,
                spec.passkey_trials,
                template,
                None,
                layout,
                device=device,
            )
        del model
    if dist.get_rank() == 0:
        report(ppl, passkey, spec, Path(out_dir), ruler=ruler)
    dist.barrier()
    return {"ppl": ppl, "passkey": passkey, "ruler": ruler}


def _spec_and_models(args):
    """The EvalSpec, data and models from --recipe and/or the flags (flags win)."""
    recipe = load_recipe(args.recipe) if args.recipe else None
    spec = recipe.eval if recipe else EvalSpec()
    data_spec = recipe.data if recipe else None
    if args.data:
        if is_local(args.data) and not Path(args.data).exists():
            raise FileNotFoundError(f"--data {args.data} does not exist; give a json/jsonl/parquet/txt file or folder")
        data_spec = DataSpec(
            source=args.data,
            eval_source=args.data,
            eval_samples=4 if args.samples is None else args.samples,
            document_masking=not args.no_document_masking,
        )
    elif data_spec is not None and args.samples is not None:
        data_spec = dataclasses.replace(data_spec, eval_samples=args.samples)
    changes = {
        k: tuple(v)
        for k, v in (
            ("ppl_lengths", args.ppl_lengths),
            ("passkey_lengths", args.passkey_lengths),
            ("passkey_depths", args.depths),
        )
        if v is not None
    }
    if args.trials is not None:
        changes["passkey_trials"] = args.trials
    if args.ruler_tasks:
        changes["ruler_tasks"] = tuple(TASKS if args.ruler_tasks == ["all"] else args.ruler_tasks)
    if args.ruler_lengths:
        changes["ruler_lengths"] = tuple(args.ruler_lengths)
    ruler_keys = (
        "ruler_trials",
        "ruler_threshold",
        "ruler_haystack",
        "ruler_value_digits",
        "ruler_scorer",
        "ruler_wording",
    )
    for key in ruler_keys:
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    if args.passkey_template:
        changes["passkey_template"] = args.passkey_template
    spec = dataclasses.replace(spec, **changes)
    if not spec.ppl_lengths and recipe:
        top = recipe.stages[-1].seq_len
        spec = dataclasses.replace(spec, ppl_lengths=tuple(2**k for k in range(8, 40) if 2**k <= top) or (top,))
    if not spec.passkey_lengths:
        spec = dataclasses.replace(spec, passkey_lengths=spec.ppl_lengths)
    if spec.ruler_tasks and not spec.ruler_lengths:
        spec = dataclasses.replace(spec, ruler_lengths=spec.passkey_lengths)
    if data_spec is not None and data_spec.source is None and data_spec.eval_source is None:
        raise ValueError(
            "the recipe trains on a mixture (data.sources) and names no held-out data for perplexity and the RULER "
            "haystack: set data.eval_source in the recipe, or pass --data"
        )
    if spec.ruler_tasks and spec.ruler_haystack == "data" and data_spec is None:
        raise ValueError("eval.ruler_haystack: data needs held-out data: give --data or a recipe with data.eval_source")
    if args.model:
        models = {Path(m).name: m for m in args.model}
        missing = [m for m in args.model if not Path(m, "config.json").is_file()]
        if missing:
            raise FileNotFoundError(
                f"--model {missing} {'is' if len(missing) == 1 else 'are'} not a model folder (no config.json); "
                "give folders written by save_pretrained, e.g. run_dir/final"
            )
    elif recipe:
        run = Path(recipe.run_dir)
        names = [f"stage{i}" for i in range(len(recipe.stages) - 1)] + ["final"]
        models = {n: str(run / n) for n in names if (run / n / "config.json").is_file()}
        if not models:
            raise FileNotFoundError(f"{run} holds no exported model yet ({names}); train first or pass --model")
    else:
        raise ValueError("give --recipe (its run's exported models) or --model PATH [PATH ...]")
    out = args.out or (str(Path(recipe.run_dir) / "eval") if recipe else "runs/eval")
    return spec, data_spec, models, out, (recipe.parallel.layout if recipe else args.layout)


def _check_ruler(spec, models: dict[str, str]) -> None:
    """Each model's tokenizer encodes the needles, and every RULER length fits every task's template."""
    from transformers import AutoTokenizer

    for path in dict.fromkeys(models.values()):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except OSError as e:
            raise FileNotFoundError(f"model {path} has no loadable tokenizer: {str(e).splitlines()[0]}") from None
        check_tokenizer(tokenizer)
        builder = Builder(tokenizer, digits=spec.ruler_value_digits, wording=spec.ruler_wording)
        for task in spec.ruler_tasks:
            need = min_length(builder, task)
            if spec.ruler_lengths[0] < need:
                raise ValueError(
                    f"eval.ruler_lengths {spec.ruler_lengths[0]} is below the {task} template's minimum of {need} "
                    f"tokens in {path}'s tokenizer; use lengths >= {need} or drop {task} from eval.ruler_tasks"
                )


def main(argv: list[str] | None = None) -> int:
    allocator_settings()  # before anything touches CUDA
    parser = argparse.ArgumentParser(prog="ringpatch eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", help="evaluate this recipe's exported models on its eval data and settings")
    parser.add_argument("--model", nargs="+", help="model folders (side by side), e.g. the base and the extended one")
    parser.add_argument("--data", help="held-out documents (json/jsonl/parquet/txt) for perplexity-vs-length")
    parser.add_argument("--ppl-lengths", type=int, nargs="+")
    parser.add_argument("--passkey-lengths", type=int, nargs="+")
    parser.add_argument("--depths", type=float, nargs="+")
    parser.add_argument("--trials", type=int)
    parser.add_argument("--samples", type=int, help="held-out sequences for perplexity")
    parser.add_argument("--passkey-template", choices=["classic", "demo"])
    parser.add_argument("--ruler-tasks", nargs="+", choices=[*TASKS, "all"], help="RULER-style tasks (all: every one)")
    parser.add_argument("--ruler-lengths", type=int, nargs="+")
    parser.add_argument("--ruler-trials", type=int)
    parser.add_argument("--ruler-threshold", type=float, help=f"effective-length threshold (default {THRESHOLD})")
    parser.add_argument("--ruler-haystack", choices=["filler", "data"])
    parser.add_argument("--ruler-value-digits", type=int, help="digits of each hidden value (default 7, as RULER)")
    parser.add_argument(
        "--ruler-scorer", choices=["teacher", "generate"], help="teacher forcing (default) or generation"
    )
    parser.add_argument(
        "--ruler-wording", choices=["auto", "short", "ruler"], help="the templates' words (default auto)"
    )
    parser.add_argument("--layout", default=DEFAULT_LAYOUT, choices=list(LAYOUTS))
    parser.add_argument(
        "--no-document-masking",
        action="store_true",
        help="with --data: let the held-out documents see each other (as training with data.document_masking: false)",
    )
    parser.add_argument("--out", help="output folder (default: run_dir/eval)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        spec, data_spec, models, out, layout = _spec_and_models(args)
        ring = launch_int("WORLD_SIZE", 1, minimum=1)  # before any group or model: lengths the ring can take
        lengths = [*spec.ppl_lengths, *spec.passkey_lengths, *spec.ruler_lengths]
        check_lengths(lengths, layout, ring, spec.max_tokens_per_rank)
        if spec.ruler_tasks:
            _check_ruler(spec, models)
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
