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

The effective length has two readings, both printed where they differ:
  prefix  the longest tested length up to which every tested length's mean score is at or above
          the threshold (a length after a drop does not count; this project's default);
  any     the longest tested length whose mean score is at or above the threshold, as RULER's
          tables report it (a non-monotone table can give a longer length than `prefix`).
The threshold is 85.6% by default, the score of Llama-2-7B at 4K that RULER uses as reference.

Where we differ from RULER: shorter template wording (the demo's byte-level model reads every
character as a token); keys are generated pseudo-words rather than dictionary words; values are
7-digit numbers; scoring is teacher-forced rather than by generated text (items after one the
model gets wrong are still checked, given the right item); the needle is placed at an exact token
offset rather than a sentence boundary.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from typing import get_args

import torch

from ringpatch.attention.layout import Layout
from ringpatch.evaluate.passkey import CLASSIC
from ringpatch.evaluate.prefill import ring_prefill_scores
from ringpatch.train.recipe import RulerTask

TASKS: tuple[str, ...] = get_args(RulerTask)  # the recipe's eval.ruler_tasks accept exactly these
THRESHOLD = 0.856  # Llama-2-7B at 4K on RULER: the reference an extended model must keep
DIGITS = "0123456789"

INTRO = {
    "niah": "Special magic numbers are hidden in the text below. Remember them.\n",
    "vt": "Chains of variable assignments are hidden in the text below. Track them.\n",
    "cwe": "Below is a list of words. Some appear more often than others. Remember the most common.\n",
}


@dataclass(frozen=True)
class Prompt:
    """One task instance: `ids` (length,): the haystack with its needles, then from `tail` on the
    question and the expected answers encoded whole, then a few filler tokens (room for the
    answers in another order, which may encode a token longer); `answers` the expected items' text
    in the order of ids; `items` their token spans [start, end) in ids; `needles` (start, length) of
    each inserted needle (the target first); `depth` the asked fraction of the haystack before the
    target; `region` (start, end) of the haystack with its needles."""

    task: str
    ids: torch.Tensor
    items: tuple[tuple[int, int], ...]
    needles: tuple[tuple[int, int], ...]
    depth: float | None
    region: tuple[int, int]
    tail: int = 0
    question: str = ""
    answers: tuple[str, ...] = ()


SLACK_PER_ITEM = 2  # filler tokens after the answer per item: an answer reordered may encode longer


def encode_answer(tokenizer, question: str, answers) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]]:
    """The question and the answers ("q a1, a2, ...") encoded as one text, and each answer's token
    span [start, end): the tokens that cover its characters and the space before it (which a BPE
    joins to the answer's first token, or keeps as a token of its own)."""
    text, chars = question, []
    for j, a in enumerate(answers):
        text += ", " if j else " "
        chars.append((len(text), len(text) + len(a)))
        text += a
    ids, ends = _encode_with_ends(tokenizer, text)
    spans = []
    for a, b in chars:
        first = next(i for i, e in enumerate(ends) if e > a - 1)
        last = next(i for i, e in enumerate(ends) if e >= b)
        spans.append((first, last + 1))
    return torch.tensor(ids, dtype=torch.long), tuple(spans)


def _encode_with_ends(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Token ids of `text` and the character each token ends at (from the offsets of a fast
    tokenizer, else by decoding each prefix)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], [end for _, end in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, KeyError):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids, [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]


class Builder:
    """Builds prompts of one task family at exact token lengths, in one tokenizer."""

    def __init__(self, tokenizer, haystack: torch.Tensor | None = None, distractors: int = 3, values: int = 3):
        self.tokenizer = tokenizer
        self.distractors, self.values = distractors, values
        self.hay = haystack if haystack is not None else self._filler(4096)

    def tok(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def _filler(self, at_least: int) -> torch.Tensor:
        unit = self.tok("".join(CLASSIC.filler) * 8)
        return unit.repeat(-(-at_least // len(unit)))

    def haystack(self, n: int, rng: random.Random) -> torch.Tensor:
        """n haystack tokens (a random window of the source, repeated as needed)."""
        if len(self.hay) < n + 1:
            self.hay = self.hay.repeat(-(-(n + 1) // len(self.hay)) + 1)
        start = rng.randrange(0, len(self.hay) - n)
        return self.hay[start : start + n]

    # --- the pieces of each task -----------------------------------------------------------
    @staticmethod
    def word(rng: random.Random) -> str:
        consonants, vowels = "bdfgklmnprstvz", "aeiou"
        return "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(3))

    @staticmethod
    def number(rng: random.Random) -> str:
        return str(rng.randrange(1_000_000, 10_000_000))

    def _niah(self, task: str, rng: random.Random):
        """(intro, needles (target first), question, answer items)."""
        keys = []
        while len(keys) < 1 + max(self.distractors, self.values):
            w = self.word(rng)
            if w not in keys:
                keys.append(w)

        def needle(k: str, v: str) -> str:
            return f" The magic number for {k} is {v}. "

        if task == "niah_single":
            value = self.number(rng)
            return INTRO["niah"], [needle(keys[0], value)], f"\nWhat is the magic number for {keys[0]}? It is", [value]
        if task == "niah_multikey":
            value = self.number(rng)
            needles = [needle(keys[0], value)] + [needle(k, self.number(rng)) for k in keys[1 : 1 + self.distractors]]
            return INTRO["niah"], needles, f"\nWhat is the magic number for {keys[0]}? It is", [value]
        if task == "niah_multivalue":
            values = [self.number(rng) for _ in range(self.values)]
            needles = [needle(keys[0], v) for v in values]
            return INTRO["niah"], needles, f"\nWhat are all the magic numbers for {keys[0]}? They are", values
        asked = keys[: self.values]
        values = [self.number(rng) for _ in asked]
        needles = [needle(k, v) for k, v in zip(asked, values, strict=True)]
        return INTRO["niah"], needles, f"\nWhat are the magic numbers for {', '.join(asked)}? They are", values

    def _vt(self, rng: random.Random):
        names = []
        while len(names) < self.values + 1:
            w = self.word(rng).upper()
            if w not in names:
                names.append(w)
        value = self.number(rng)
        needles = [f" VAR {names[0]} = {value}. "] + [
            f" VAR {names[i]} = VAR {names[i - 1]}. " for i in range(1, len(names))
        ]
        question = f"\nWhich variables are assigned the value {value}? They are"
        return INTRO["vt"], needles, question, names

    # --- assembly ---------------------------------------------------------------------------
    def build(self, task: str, length: int, depth: float | None, rng: random.Random) -> Prompt:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
        if task == "cwe":
            return self._cwe(length, rng)
        intro, needles, question, answers = self._vt(rng) if task == "vt" else self._niah(task, rng)
        head = self.tok(intro)
        needle_ids = [self.tok(n) for n in needles]
        tail = len(encode_answer(self.tokenizer, question, answers)[0]) + SLACK_PER_ITEM * len(answers)
        region = length - len(head) - tail  # haystack + needles
        room = region - sum(len(n) for n in needle_ids)
        if room < 0:
            raise ValueError(f"{task} at {length} tokens: the template alone needs {length - room} tokens")
        starts = self._place(needle_ids, region, depth if depth is not None else 0.5, task == "vt", rng)
        if task == "niah_multivalue":  # all values of one key: asked for in the order they appear
            answers = [answers[i] for i in sorted(range(len(starts)), key=starts.__getitem__)]
        order = sorted(range(len(needle_ids)), key=starts.__getitem__)
        hay, pieces, cursor, used = self.haystack(room, rng), [head], 0, 0
        for i in order:
            gap = starts[i] - cursor
            pieces += [hay[used : used + gap], needle_ids[i]]
            used, cursor = used + gap, starts[i] + len(needle_ids[i])
        pieces.append(hay[used:room])
        ids, items, at = self._finish(pieces, question, answers, length, rng)
        needles = tuple((len(head) + s, len(n)) for s, n in zip(starts, needle_ids, strict=True))
        return Prompt(task, ids, items, needles, depth, (len(head), len(head) + region), at, question, tuple(answers))

    def _finish(self, pieces, question: str, answers, length: int, rng: random.Random):
        """(ids, answer spans, where the question starts): the pieces, the question and answers
        encoded whole, and filler to `length`."""
        at = sum(len(p) for p in pieces)
        tail, spans = encode_answer(self.tokenizer, question, answers)
        pad = length - at - len(tail)
        if pad < 0:
            raise ValueError(f"the answer in this order needs {-pad} more tokens than the prompt has room for")
        ids = torch.cat([*pieces, tail, self.haystack(pad, rng) if pad else tail[:0]])
        assert len(ids) == length, (len(ids), length)
        return ids, tuple((at + a, at + b) for a, b in spans), at

    def reorder(self, prompt: Prompt, order) -> Prompt | None:
        """`prompt` with its answers in `order` (indices into prompt.answers), encoded whole, the
        filler after them kept; None when they do not fit its length."""
        answers = tuple(prompt.answers[i] for i in order)
        tail, spans = encode_answer(self.tokenizer, prompt.question, answers)
        if prompt.tail + len(tail) > len(prompt.ids):
            return None
        ids = torch.cat([prompt.ids[: prompt.tail], tail, prompt.ids[prompt.tail + len(tail) :]])
        items = tuple((prompt.tail + a, prompt.tail + b) for a, b in spans)
        return replace(prompt, ids=ids, items=items, answers=answers)

    @staticmethod
    def _place(needles, region: int, depth: float, chain: bool, rng: random.Random) -> list[int]:
        """Start of each needle in the region: the first at `depth` exactly; the others at random
        places that do not overlap (vt: after the first, in chain order)."""
        lengths = [len(n) for n in needles]
        free = region - sum(lengths)  # haystack tokens
        first = round(depth * free)  # haystack tokens before the target
        if not chain:
            cuts = sorted(rng.randint(0, free) for _ in lengths[1:])
            # haystack offsets: the target's is fixed; the others land among the remaining gaps
            offsets = [first, *cuts]
        else:
            offsets = [first, *sorted(rng.randint(first, free) for _ in lengths[1:])]
        order = sorted(range(len(lengths)), key=lambda i: (offsets[i], i))
        starts, before = [0] * len(lengths), 0
        for i in order:
            starts[i] = offsets[i] + before
            before += lengths[i]
        return starts

    def _cwe(self, length: int, rng: random.Random, common: int = 5, times: int = 6) -> Prompt:
        """A list of words: `common` words `times` times each, every other word once or twice, in
        random order; filler pads the start so the prompt has exactly `length` tokens."""
        head = self.tok(INTRO["cwe"])
        question = f"\nWhat are the {common} most common words in the list? They are"
        seen: set[str] = set()

        def fresh(count: int) -> list[str]:
            out = []
            while len(out) < count:
                w = self.word(rng) + self.word(rng)[:2]  # 4 syllables: collisions stay rare at 1M tokens
                if w not in seen:
                    seen.add(w)
                    out.append(w)
            return out

        top = fresh(common)
        tail = len(encode_answer(self.tokenizer, question, top)[0]) + SLACK_PER_ITEM * common
        room = length - len(head) - tail
        entries = [self.tok(" " + w) for w in top for _ in range(times)]
        size = sum(len(e) for e in entries)
        if size > room:
            raise ValueError(f"cwe at {length} tokens: the template alone needs {length - room + size} tokens")
        full = False
        while not full:  # rare words, tokenised a batch at a time
            batch = fresh(256)
            for j, ids in enumerate(self.tokenizer([" " + w for w in batch], add_special_tokens=False)["input_ids"]):
                piece, twice = torch.tensor(ids, dtype=torch.long), j % 2 == 1
                if size + len(piece) * (2 if twice else 1) > room:
                    full = True
                    break
                entries += [piece, piece] if twice else [piece]
                size += len(piece) * (2 if twice else 1)
        rng.shuffle(entries)
        first: dict[tuple, int] = {}
        for e in entries:
            first.setdefault(tuple(e.tolist()), len(first))
        order = sorted(range(common), key=lambda i: first[tuple(self.tok(" " + top[i]).tolist())])
        pad = self.haystack(room - size, rng)
        answers = tuple(top[i] for i in order)
        ids, items, at = self._finish([pad, head, *entries], question, answers, length, rng)
        region = (len(pad) + len(head), len(pad) + len(head) + size)
        return Prompt("cwe", ids, items, (), None, region, at, question, answers)


def min_length(builder: Builder, task: str) -> int:
    """The fewest tokens a prompt of `task` can have (its template with no haystack), to 16."""
    for n in range(16, 1 << 20, 16):
        try:
            builder.build(task, n, 0.5, random.Random(0))
            return n
        except ValueError:
            continue
    raise ValueError(f"{task}: no length up to 1M fits its template")


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


def score_prompt(model, builder: Builder, prompt: Prompt, group=None, layout: Layout = "zigzag", device=None,
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


def ruler_scores(
    model,
    tokenizer,
    tasks,
    lengths,
    depths,
    trials: int,
    group=None,
    layout: Layout = "zigzag",
    haystack: torch.Tensor | None = None,
    seed: int = 0,
    device=None,
    ordered: bool = False,
) -> tuple[dict[tuple[str, int], float], dict[int, float]]:
    """({(task, length): mean score over depths x trials}, {length: seconds}). The prompts are the
    same on every rank (seeded by task, length, depth and trial)."""
    builder = Builder(tokenizer, haystack)
    scores, seconds = {}, {}
    for n in lengths:
        started = time.perf_counter()
        for task in tasks:
            total, count = 0.0, 0
            for depth in depths if task != "cwe" else [None]:
                for trial in range(trials):
                    prompt = builder.build(task, n, depth, random.Random(f"{seed}-{task}-{n}-{depth}-{trial}"))
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
