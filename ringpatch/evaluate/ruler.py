"""Effective context: RULER-style synthetic tasks scored by ring prefill.

RULER (Hsieh et al. 2024, arXiv:2404.06654) measures what a model does with its context, not
whether it accepts it. The prompts (ringpatch/data/tasks.py: niah_single, niah_multikey,
niah_multivalue, niah_multiquery, vt, cwe) are built in the model's own tokenizer, question and
answer encoded as one text, so a BPE's " 3141592" is the answer a model would write.

Scoring (docs/training.md, "Evaluation"):
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

import random
import time

import torch

from ringpatch.attention.layout import DEFAULT_LAYOUT, Layout
from ringpatch.data.tasks import (
    DIGITS,
    EVAL_SEED,
    SLACK_PER_ITEM,
    TASKS,
    THRESHOLD,
    Builder,
    Prompt,
    encode_answer,
    min_length,
)
from ringpatch.evaluate.prefill import ring_prefill_scores

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
        raise ValueError(
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
        raise ValueError(f"scorer must be one of {list(SCORERS)}, got {scorer!r}")
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
        raise ValueError(f"effective length rule must be 'prefix' or 'any', got {rule!r}")
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
