"""Effective context: RULER-style synthetic tasks scored by ring prefill.

RULER (Hsieh et al. 2024, arXiv:2404.06654) measures what a model does with its context, not
whether it accepts it. The prompts (ringpatch/data/tasks.py: niah_single, niah_multikey,
niah_multivalue, niah_multiquery, vt, cwe) are built in the model's own tokenizer, question and
answer encoded as one text, so a BPE's " 3141592" is the answer a model would write.

Scoring (docs/evaluation.md):
  teacher   the default: an item counts when greedy decoding would produce it, checked by
            teacher forcing in one prefill, and again in the model's own order where it starts
            another expected item (RULER's order-free string_match_all); ordered=True keeps the
            question's order
  generate  RULER's own: greedy decoding, one ring prefill per written token, the items
            matched in the decoded text; the two agree on a model that answers in the
            template's format
The effective length has two readings, both printed where they differ: "prefix" (this
project's default), the longest length up to which every tested length scores at or above the
threshold; "any", the longest length that does, as RULER's tables read. The threshold is 0.856,
Llama-2-7B at 4K, RULER's reference. Where we differ from RULER: a shorter wording for byte-level tokenizers (RULER's own
otherwise: eval.ruler_wording), pseudo-word keys (the evaluation's half of them), values of
eval.ruler_value_digits digits (7, as RULER), needles at exact token offsets, teacher forcing
by default.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Annotated, Literal

import torch

from ringpatch.attention.layout import DEFAULT_LAYOUT, Layout
from ringpatch.data.tasks import (
    DIGITS,
    EVAL_SEED,
    MAX_DIGITS,
    SLACK_PER_ITEM,
    TASKS,
    THRESHOLD,
    Builder,
    Prompt,
    RulerTask,
    encode_answer,
    min_length,
)
from ringpatch.errors import BadValue
from ringpatch.evaluate.heldout import held_out
from ringpatch.evaluate.prefill import ring_prefill_scores
from ringpatch.evaluate.report import check_fractions, check_increasing, format_table, pyplot, write_rows
from ringpatch.evaluate.task import EvalTask
from ringpatch.schema import POSITIVE, Key, Range

__all__ = ["TASKS", "Builder", "Prompt", "encode_answer", "min_length", "check_tokenizer", "score",
           "scored_positions", "score_prompt", "generate_answer", "score_generated", "ruler_scores",
           "effective_length", "task_means"]  # fmt: skip


def check_tokenizer(tokenizer) -> None:
    """The tokenizer must encode and decode the needle alphabet (digits and the key letters)."""
    bad = []
    for text in ("0123456789", "bdfgklmnprstvz aeiou", "VAR BADOKU = 1234567."):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        unk = getattr(tokenizer, "unk_token_id", None)
        if (unk is not None and unk in ids) or tokenizer.decode(ids).strip() != text.strip():
            bad.append(text)
    if bad:
        raise BadValue(
            f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} does not encode the needle alphabet "
            f"faithfully ({bad} do not round-trip); the RULER tasks need digits and Latin letters: use another "
            "tokenizer or leave eval.ruler_tasks empty"
        )


def score(prompt: Prompt, correct: torch.Tensor) -> float:
    """Fraction of the expected items produced, from teacher-forced argmax hits: `correct` (K,)
    over the positions of `scored_positions(prompt)`."""
    hits, at = 0, 0
    for start, end in prompt.items:
        n = end - start
        hits += int(bool(correct[at : at + n].all()))
        at += n
    return hits / len(prompt.items)


def scored_positions(prompt: Prompt) -> torch.Tensor:
    """The positions whose next-token prediction is each answer token."""
    return torch.cat([torch.arange(s - 1, e - 1) for s, e in prompt.items])


def score_prompt(model, builder: Builder, prompt: Prompt, group=None, layout: Layout = DEFAULT_LAYOUT, device=None,
                 ordered: bool = False) -> float:  # fmt: skip
    """Fraction of the prompt's expected items that greedy decoding after the question would
    produce, in any order (the module docstring); the same on every rank of `group`."""
    order = list(range(len(prompt.items)))  # the answer in each slot, as indices of prompt.answers
    base, current, slot, hits, tried = prompt, prompt, 0, 0, set()
    while slot < len(order):
        positions = scored_positions(current)
        _, correct, argmax = ring_prefill_scores(
            model, current.ids[None].to(device), positions.to(device), group, layout, predicted=True
        )
        correct, argmax = correct[0].cpu().bool(), argmax[0].cpu()
        starts = [0]
        for a, b in current.items:
            starts.append(starts[-1] + b - a)
        switched = False
        while slot < len(order) and not switched:
            here = correct[starts[slot] : starts[slot + 1]]
            if bool(here.all()):
                hits, slot, tried = hits + 1, slot + 1, set()
                continue
            tried.add(order[slot])
            miss = int((~here).nonzero()[0, 0])  # the first token greedy decoding writes otherwise
            start = current.items[slot][0]
            wrote = torch.cat(
                [current.ids[start : start + miss], argmax[starts[slot] + miss : starts[slot] + miss + 1]]
            )
            for c in [] if ordered else order[slot + 1 :]:
                if c in tried:
                    continue
                candidate = order[:slot] + [c] + [x for x in order[slot:] if x != c]
                other = builder.reorder(base, candidate)
                if other is None or other.items[slot][0] != start or other.items[slot][1] - start <= miss:
                    continue
                if torch.equal(other.ids[start : start + miss + 1], wrote):  # c agrees with what it wrote
                    order, current, switched = candidate, other, True  # follow the model's order
                    break
            if not switched:  # greedy decoding writes something else here: this slot's item is missed
                slot, tried = slot + 1, set()
    return hits / len(order)


SCORERS = ("teacher", "generate")


def generate_answer(model, prompt: Prompt, group=None, layout: Layout = DEFAULT_LAYOUT, device=None) -> torch.Tensor:
    """The tokens greedy decoding writes after the question: one ring prefill per token (the ring
    keeps no cache), each over the whole prompt length with the tokens written so far in place;
    what follows them cannot reach them under causal attention, so the length stays one the
    layout cuts. At most the expected answer's length plus SLACK_PER_ITEM per item."""
    ids = prompt.ids.clone()
    start = prompt.items[0][0]
    end = min(len(ids), prompt.items[-1][1] + SLACK_PER_ITEM * len(prompt.items))
    for at in range(start, end):
        position = torch.tensor([at - 1], device=device)
        _, _, argmax = ring_prefill_scores(model, ids[None].to(device), position, group, layout, predicted=True)
        ids[at] = int(argmax[0, 0])
    return ids[start:end]


def score_generated(prompt: Prompt, text: str) -> float:
    """RULER's string_match_all: the fraction of the expected items found in the generated text
    (case-insensitive, in any order)."""
    return sum(a.lower() in text.lower() for a in prompt.answers) / len(prompt.answers)


def ruler_scores(
    model,
    tokenizer,
    tasks,
    lengths,
    depths,
    trials: int,
    group=None,
    layout: Layout = DEFAULT_LAYOUT,
    haystack: torch.Tensor | None = None,
    seed: int = EVAL_SEED,
    device=None,
    ordered: bool = False,
    digits: int = DIGITS,
    scorer: str = "teacher",
    wording: str = "auto",
) -> tuple[dict[tuple[str, int], float], dict[int, float]]:
    """({(task, length): mean score over depths x trials}, {length: seconds}). The prompts are the
    same on every rank (seeded by task, length, depth and trial); values have `digits` digits.
    scorer: "teacher" (score_prompt, one or two prefills a prompt) or "generate" (greedy decoding,
    one prefill per answer token, matched as RULER matches text). wording: the templates' words
    (data/tasks.py WORDING; auto: RULER's unless the tokenizer is byte-level)."""
    if scorer not in SCORERS:
        raise BadValue(f"scorer must be one of {list(SCORERS)}, got {scorer!r}")
    builder = Builder(tokenizer, haystack, digits=digits, wording=wording)
    scores, seconds = {}, {}
    for n in lengths:
        started = time.perf_counter()
        for task in tasks:
            total, count = 0.0, 0
            for depth in depths if task != "cwe" else [None]:
                for trial in range(trials):
                    prompt = builder.build(task, n, depth, random.Random(f"{seed}-{task}-{n}-{depth}-{trial}"))
                    if scorer == "generate":
                        written = generate_answer(model, prompt, group, layout, device)
                        total += score_generated(prompt, tokenizer.decode(written.tolist()))
                    else:
                        total += score_prompt(model, builder, prompt, group, layout, device, ordered)
                    count += 1
            scores[(task, n)] = total / count
        seconds[n] = time.perf_counter() - started
    return scores, seconds


def effective_length(means: dict[int, float], threshold: float = THRESHOLD, rule: str = "prefix") -> int:
    """The effective length (0: none) by one of the two readings of the module docstring:
    prefix, the longest length up to which every tested length's mean score is >= threshold; any,
    the longest length whose mean score is >= threshold."""
    if rule not in ("prefix", "any"):
        raise BadValue(f"effective length rule must be 'prefix' or 'any', got {rule!r}")
    best = 0
    for n in sorted(means):
        if means[n] >= threshold:
            best = n
        elif rule == "prefix":
            break
    return best


def task_means(scores: dict[tuple[str, int], float]) -> dict[int, float]:
    """{length: mean over tasks}."""
    by_length: dict[int, list[float]] = {}
    for (_, n), v in scores.items():
        by_length.setdefault(n, []).append(v)
    return {n: sum(v) / len(v) for n, v in sorted(by_length.items())}


def plot_ruler(ruler: dict[str, dict], path) -> None:
    """One heatmap per model: tasks (and their mean) by length."""
    plt = pyplot()

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


class Ruler(EvalTask):
    name = "ruler"
    keys = (
        Key("ruler_tasks", tuple[RulerTask, ...], (),
            "RULER-style tasks for the effective length (ringpatch/evaluate/ruler.py; empty: none)."),
        Key("ruler_lengths", Annotated[tuple[int, ...], POSITIVE], (),
            "Prompt lengths for the RULER tasks (empty: the passkey lengths)."),
        Key("ruler_depths", tuple[float, ...], (0.1, 0.5, 0.9), "Fraction of the haystack before the target needle."),
        Key("ruler_trials", Annotated[int, POSITIVE], 2, "Prompts per (task, length, depth)."),
        Key("ruler_haystack", Literal["filler", "data"], "filler",
            "filler: the repeated Landmark sentences; data: the held-out data (data.eval_source)."),
        Key("ruler_scorer", Literal["teacher", "generate"], "teacher",
            "teacher: teacher-forced greedy, one or two prefills a prompt; generate: greedy decoding, one prefill per "
            "answer token, the answer matched in the text as RULER does (ringpatch/evaluate/ruler.py)."),
        Key("ruler_wording", Literal["auto", "short", "ruler"], "auto",
            "The templates' words: ruler, RULER's own; short, a shorter form for byte-level tokenizers; auto, "
            "RULER's when the tokenizer reads >= 2 characters per token of them (ringpatch/data/tasks.py)."),
        Key("ruler_value_digits", Annotated[int, Range(1, MAX_DIGITS)], DIGITS,
            f"Digits of each value the tasks hide (RULER: {DIGITS}; fewer for a model too small to copy {DIGITS})."),
        Key("ruler_threshold", Annotated[float, Range(0.0, 1.0)], THRESHOLD,
            f"Effective length: the longest length up to which the mean task score stays >= this ({THRESHOLD}: "
            "Llama-2-7B at 4K, RULER's reference)."),
    )  # fmt: skip
    FLAGS = ("ruler_trials", "ruler_threshold", "ruler_haystack", "ruler_value_digits", "ruler_scorer",
             "ruler_wording")  # fmt: skip

    def check_spec(self, spec) -> None:
        check_fractions("eval.ruler_depths", spec.ruler_depths)
        check_increasing("eval.ruler_lengths", spec.ruler_lengths)
        if len(set(spec.ruler_tasks)) != len(spec.ruler_tasks):
            raise BadValue(f"eval.ruler_tasks names a task twice: {list(spec.ruler_tasks)}")

    def add_flags(self, parser) -> None:
        parser.add_argument(
            "--ruler-tasks", nargs="+", choices=[*TASKS, "all"], help="RULER-style tasks (all: every one)"
        )
        parser.add_argument(
            "--ruler-lengths",
            type=int,
            nargs="+",
            metavar="N",
            help="prompt lengths for the RULER tasks (default: the recipe's eval.ruler_lengths, else the passkey lengths)",
        )
        parser.add_argument(
            "--ruler-depths",
            type=float,
            nargs="+",
            help="fractions of the haystack before the needle (default 0.1 0.5 0.9)",
        )
        parser.add_argument("--ruler-trials", type=int, help="prompts per (task, length, depth) (default 2)")
        parser.add_argument("--ruler-threshold", type=float, help=f"effective-length threshold (default {THRESHOLD})")
        parser.add_argument("--ruler-haystack", choices=["filler", "data"])
        parser.add_argument(
            "--ruler-value-digits", type=int, help=f"digits of each hidden value (default {DIGITS}, as RULER)"
        )
        parser.add_argument(
            "--ruler-scorer", choices=["teacher", "generate"], help="teacher forcing (default) or generation"
        )
        parser.add_argument(
            "--ruler-wording", choices=["auto", "short", "ruler"], help="the templates' words (default auto)"
        )

    def changes(self, args) -> dict:
        found = {key: getattr(args, key) for key in self.FLAGS if getattr(args, key) is not None}
        if args.ruler_tasks:
            found["ruler_tasks"] = tuple(TASKS if args.ruler_tasks == ["all"] else args.ruler_tasks)
        for key in ("ruler_lengths", "ruler_depths"):
            if getattr(args, key):
                found[key] = tuple(getattr(args, key))
        return found

    def complete(self, spec, recipe, data_spec):
        if spec.ruler_tasks and spec.ruler_haystack == "data" and data_spec is None:
            raise BadValue(
                "eval.ruler_haystack: data needs held-out data: give --data or a recipe with data.eval_source"
            )
        if spec.ruler_tasks and not spec.ruler_lengths:
            if recipe is None and not spec.passkey_lengths:
                raise BadValue("--ruler-tasks needs --ruler-lengths (or --passkey-lengths, which it then takes)")
            return dataclasses.replace(spec, ruler_lengths=spec.passkey_lengths)
        return spec

    def enabled(self, spec, data_spec) -> bool:
        return bool(spec.ruler_tasks)

    def lengths(self, spec) -> tuple[int, ...]:
        return spec.ruler_lengths

    def prefills(self, spec, data_spec) -> list[tuple[int, int]]:
        # teacher: one prefill a prompt (two when the model answers in another order); generate: one a
        # written token, at least a value's digits and the slack
        each = 1 if spec.ruler_scorer == "teacher" else spec.ruler_value_digits + SLACK_PER_ITEM
        return [(n, 1) for n in spec.ruler_lengths for task in spec.ruler_tasks
                for _ in (spec.ruler_depths if task != "cwe" else [None]) for _ in range(spec.ruler_trials * each)]  # fmt: skip

    def check_inputs(self, spec, data_spec, tokenizers: dict[str, object]) -> None:
        """Each model's tokenizer encodes the needles, and every RULER length fits every task's template."""
        if not spec.ruler_tasks:
            return
        for path, tokenizer in tokenizers.items():
            check_tokenizer(tokenizer)
            builder = Builder(tokenizer, digits=spec.ruler_value_digits, wording=spec.ruler_wording)
            for task in spec.ruler_tasks:
                need = min_length(builder, task)
                if spec.ruler_lengths[0] < need:
                    raise BadValue(
                        f"eval.ruler_lengths {spec.ruler_lengths[0]} is below the {task} template's minimum of {need} "
                        f"tokens in {path}'s tokenizer; use lengths >= {need} or drop {task} from eval.ruler_tasks"
                    )

    def run(self, model, tokenizer, spec, data_spec, layout, device):
        haystack = None
        if spec.ruler_haystack == "data":  # the held-out data's tokens, rows end to end
            ids, _ = held_out(data_spec, tokenizer, max(spec.ruler_lengths), data_spec.eval_samples, device)
            haystack = ids.reshape(-1).cpu()
        scores, seconds = ruler_scores(model, tokenizer, spec.ruler_tasks, spec.ruler_lengths, spec.ruler_depths,
                                       spec.ruler_trials, None, layout, haystack=haystack, device=device,
                                       digits=spec.ruler_value_digits, scorer=spec.ruler_scorer,
                                       wording=spec.ruler_wording)  # fmt: skip
        return {"scores": scores, "seconds": seconds, "claimed": model.config.max_position_embeddings}

    def report(self, results: dict, spec, out: Path) -> None:
        report_ruler(results, spec, out)


RULER = Ruler()
