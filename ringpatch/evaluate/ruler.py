"""Effective context: RULER-style synthetic tasks scored by ring prefill.

RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", arXiv:2404.06654) measures what a model does with its context, not whether it accepts
it. We build its retrieval, tracing and aggregation tasks in the model's own tokenizer, at exact
token lengths and controlled depths:

  niah_single      one key with one value in the haystack; asked for the value
  niah_multikey    the same, among `distractors` needles with other keys
  niah_multivalue  one key with several values; all are asked for
  niah_multiquery  several keys, each with a value; all are asked for at once
  vt               variable tracking: VAR X1 = v, then a chain VAR X2 = VAR X1, ...; asked which
                   variables hold v (multi-hop tracing)
  cwe              common words extraction: a list where a few words appear many times and the
                   rest a few times; asked for the most common (aggregation)

The haystack is repeated filler (the Landmark-attention sentences, as `passkey` uses) or real
text: the recipe's own held-out data, prepared.

The question and its answer are one text, encoded whole: "... It is 3141592" is tokenized as the
model reads and writes it, so with a BPE that joins a space to the next word or number the answer
starts with " 3" as it would in the model's own output (encoding "It is " and "3141592" apart
gives a lone " " token, which a model that answers " 3" fails). Each answer's tokens are the
tokens of the whole encoding that cover its characters.

Scoring is teacher-forced greedy, in any order: an expected item counts when greedy decoding
after the question would produce it, each of its tokens the argmax given the prompt and what was
produced before it. One prefill checks the items in the question's order; where the model's
argmax at an item's start is the first token of another expected item instead, the items are
reordered to follow the model and the prompt is prefilled again, so a model that lists the right
items in another order scores as RULER's order-free `string_match_all` scores it. A prompt's
score is the fraction of its items produced; a task's score at a length is the mean over depths
and trials. `ordered=True` scores the question's order only (no second prefill).

The generation scorer (scorer="generate", eval.ruler_scorer) is RULER's own: greedy decoding
after the question, one ring prefill per written token, and the fraction of expected items found
in the decoded text. It costs a prefill per answer token where teacher forcing costs one or two
a prompt; on a model that answers in the template's format the two agree (a test holds them to
it on every task).

The effective length has two readings, both printed where they differ:
  prefix  the longest tested length up to which every tested length's mean score is at or above
          the threshold (a length after a drop does not count; this project's default);
  any     the longest tested length whose mean score is at or above the threshold, as RULER's
          tables report it (a non-monotone table can give a longer length than `prefix`).
The threshold is 85.6% by default, the score of Llama-2-7B at 4K that RULER uses as reference.

The prompts are built by ringpatch/data/tasks.py, which also makes them as a training source
(synthetic:ruler) from the other, disjoint half of the pseudo-words.

Where we differ from RULER: shorter template wording (the demo's byte-level model reads every
character as a token); keys are generated pseudo-words (the evaluation's half of them) rather
than dictionary words; values are 7-digit numbers (eval.ruler_value_digits: fewer for a model
too small to copy 7); scoring is teacher-forced by default (items after one the model gets wrong
are still checked, given the right item); the needle is placed at an exact token offset rather
than a sentence boundary.
"""

from __future__ import annotations

import random
import time

import torch

from ringpatch.attention.layout import DEFAULT_LAYOUT, Layout
from ringpatch.data.tasks import DIGITS, EVAL_SEED, SLACK_PER_ITEM, TASKS, Builder, Prompt, encode_answer, min_length
from ringpatch.evaluate.prefill import ring_prefill_scores

__all__ = ["TASKS", "Builder", "Prompt", "encode_answer", "min_length", "check_tokenizer", "score",
           "scored_positions", "score_prompt", "generate_answer", "score_generated", "ruler_scores",
           "effective_length", "task_means"]  # fmt: skip

THRESHOLD = 0.856  # Llama-2-7B at 4K on RULER: the reference an extended model must keep


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
) -> tuple[dict[tuple[str, int], float], dict[int, float]]:
    """({(task, length): mean score over depths x trials}, {length: seconds}). The prompts are the
    same on every rank (seeded by task, length, depth and trial); values have `digits` digits.
    scorer: "teacher" (score_prompt, one or two prefills a prompt) or "generate" (greedy decoding,
    one prefill per answer token, matched as RULER matches text)."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {list(SCORERS)}, got {scorer!r}")
    builder = Builder(tokenizer, haystack, digits=digits)
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
