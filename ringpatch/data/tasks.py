"""RULER-style task prompts, built in the model's own tokenizer at exact token lengths: for the
evaluation (ringpatch/evaluate/ruler.py scores them) and as a synthetic training source
(data.sources with source: synthetic:ruler).

  niah_single      one key with one value in the haystack; asked for the value
  niah_multikey    the same, among `distractors` needles with other keys
  niah_multivalue  one key with several values; all are asked for
  niah_multiquery  several keys, each with a value; all are asked for at once
  vt               variable tracking: VAR X1 = v, then a chain VAR X2 = VAR X1, ...; asked which
                   variables hold v (multi-hop tracing)
  cwe              common words extraction: a list where a few words appear many times and the
                   rest a few times; asked for the most common (aggregation)

The haystack is repeated filler (the Landmark-attention sentences) or given tokens (held-out data).

The keys, variable names and common words are pseudo-words (consonant-vowel syllables), split in
two disjoint halves by a hash: evaluation prompts use one half, training documents the other, so
no evaluation prompt can appear in training data whatever the seeds.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch

from ringpatch.errors import BadValue

RulerTask = Literal["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe"]
TASKS: tuple[str, ...] = get_args(RulerTask)
WordHalf = Literal["eval", "train"]
EVAL_SEED = 0  # the evaluation's prompts are seeded by (EVAL_SEED, task, length, depth, trial)
DIGITS = 7  # RULER's values: 7-digit numbers
THRESHOLD = 0.856  # the effective length's: Llama-2-7B at 4K on RULER, the reference an extended model must keep
MAX_DIGITS = 18
SYNTHETIC = "synthetic:ruler"  # the data.sources name of the training generator
# the Landmark-attention filler sentences (Mohtashami & Jaggi 2023), as the passkey test uses them
LANDMARK_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

# The words of each task. "ruler": RULER's own templates (needle, question and answer prefix),
# for tokenizers that read several characters per token; "short": a shorter form for byte-level
# tokenizers, where every character costs a token. Builder(wording="auto") picks by the tokenizer.
WORDING = {
    "short": {
        "niah_intro": "Special magic numbers are hidden in the text below. Remember them.\n",
        "needle": " The magic number for {key} is {value}. ",
        "single": "\nWhat is the magic number for {key}? It is",
        "multivalue": "\nWhat are all the magic numbers for {key}? They are",
        "multiquery": "\nWhat are the magic numbers for {keys}? They are",
        "vt_intro": "Chains of variable assignments are hidden in the text below. Track them.\n",
        "vt_first": " VAR {name} = {value}. ",
        "vt_link": " VAR {name} = VAR {previous}. ",
        "vt_question": "\nWhich variables are assigned the value {value}? They are",
        "cwe_intro": "Below is a list of words. Some appear more often than others. Remember the most common.\n",
        "cwe_question": "\nWhat are the {count} most common words in the list? They are",
    },
    "ruler": {
        "niah_intro": "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the numbers afterwards.\n",
        "needle": " One of the special magic numbers for {key} is: {value}. ",
        "single": "\nWhat is the special magic number for {key} mentioned in the provided text? The special magic "
        "number for {key} mentioned in the provided text is",
        "multivalue": "\nWhat are all the special magic numbers for {key} mentioned in the provided text? The special "
        "magic numbers for {key} mentioned in the provided text are",
        "multiquery": "\nWhat are all the special magic numbers for {keys} mentioned in the provided text? The special "
        "magic numbers for {keys} mentioned in the provided text are",
        "vt_intro": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
        "vt_first": " VAR {name} = {value}. ",
        "vt_link": " VAR {name} = VAR {previous}. ",
        "vt_question": "\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
        "According to the chain(s) of variable assignment in the text above, {count} variables are assigned the "
        "value {value}, they are:",
        "cwe_intro": "Below is a list of words. In these words, some appear more often than others. Memorize the ones "
        "that appear most often.\n",
        "cwe_question": "\nQuestion: What are the {count} most common words in the above list? Answer: The top {count} "
        "words that appear most often in the list are:",
    },
}
WORDINGS = ("auto", *WORDING)


def wording_for(tokenizer, wording: str = "auto") -> str:
    """ "auto": RULER's words when the tokenizer reads at least 2 characters per token of them,
    the short form otherwise (a byte-level tokenizer); else `wording` itself, checked."""
    if wording not in WORDINGS:
        raise BadValue(f"wording must be one of {list(WORDINGS)}, got {wording!r}")
    if wording != "auto":
        return wording
    text = WORDING["ruler"]["niah_intro"]
    return "ruler" if len(text) >= 2 * len(tokenizer(text, add_special_tokens=False)["input_ids"]) else "short"


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

    def __init__(self, tokenizer, haystack: torch.Tensor | None = None, distractors: int = 3, values: int = 3,
                 words: WordHalf = "eval", digits: int = DIGITS, intro: bool = True,
                 wording: str = "auto"):  # fmt: skip
        if words not in get_args(WordHalf):
            raise BadValue(f"words must be one of {list(get_args(WordHalf))}, got {words!r}")
        if not isinstance(digits, int) or not 1 <= digits <= MAX_DIGITS:
            raise BadValue(f"value digits must be an integer in [1, {MAX_DIGITS}], got {digits!r}")
        self.digits, self.intro = digits, intro
        self.words = WORDING[wording_for(tokenizer, wording)]
        self.tokenizer, self.half = tokenizer, get_args(WordHalf).index(words)
        self.distractors, self.values = distractors, values
        self.hay = haystack if haystack is not None else self._filler(4096)

    def tok(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def _filler(self, at_least: int) -> torch.Tensor:
        unit = self.tok(LANDMARK_FILLER * 8)
        return unit.repeat(-(-at_least // len(unit)))

    def haystack(self, n: int, rng: random.Random) -> torch.Tensor:
        """n haystack tokens (a random window of the source, repeated as needed)."""
        if len(self.hay) < n + 1:
            self.hay = self.hay.repeat(-(-(n + 1) // len(self.hay)) + 1)
        start = rng.randrange(0, len(self.hay) - n)
        return self.hay[start : start + n]

    # --- the pieces of each task -----------------------------------------------------------
    def word(self, rng: random.Random) -> str:
        """A 3-syllable pseudo-word from this builder's half of them (the module docstring)."""
        while True:
            w = pseudo_word(rng)
            if word_half(w) == self.half:
                return w

    def number(self, rng: random.Random) -> str:
        """A value of `digits` digits (RULER's are 7), the first not 0 unless it is the only one."""
        return str(rng.randrange(10 ** (self.digits - 1) if self.digits > 1 else 0, 10**self.digits))

    def _niah(self, task: str, rng: random.Random):
        """(intro, needles (target first), question, answer items)."""
        keys = []
        while len(keys) < 1 + max(self.distractors, self.values):
            w = self.word(rng)
            if w not in keys:
                keys.append(w)

        w = self.words

        def needle(k: str, v: str) -> str:
            return w["needle"].format(key=k, value=v)

        if task == "niah_single":
            value = self.number(rng)
            return w["niah_intro"], [needle(keys[0], value)], w["single"].format(key=keys[0]), [value]
        if task == "niah_multikey":
            value = self.number(rng)
            needles = [needle(keys[0], value)] + [needle(k, self.number(rng)) for k in keys[1 : 1 + self.distractors]]
            return w["niah_intro"], needles, w["single"].format(key=keys[0]), [value]
        if task == "niah_multivalue":
            values = [self.number(rng) for _ in range(self.values)]
            needles = [needle(keys[0], v) for v in values]
            return w["niah_intro"], needles, w["multivalue"].format(key=keys[0]), values
        asked = keys[: self.values]
        values = [self.number(rng) for _ in asked]
        needles = [needle(k, v) for k, v in zip(asked, values, strict=True)]
        return w["niah_intro"], needles, w["multiquery"].format(keys=", ".join(asked)), values

    def _vt(self, rng: random.Random):
        names = []
        while len(names) < self.values + 1:
            w = self.word(rng).upper()
            if w not in names:
                names.append(w)
        value = self.number(rng)
        w = self.words
        needles = [w["vt_first"].format(name=names[0], value=value)] + [
            w["vt_link"].format(name=names[i], previous=names[i - 1]) for i in range(1, len(names))
        ]
        return w["vt_intro"], needles, w["vt_question"].format(value=value, count=len(names)), names

    # --- assembly ---------------------------------------------------------------------------
    def build(self, task: str, length: int, depth: float | None, rng: random.Random) -> Prompt:
        if task not in TASKS:
            raise BadValue(f"unknown task {task!r}; choose from {list(TASKS)}")
        if task == "cwe":
            return self._cwe(length, rng)
        intro, needles, question, answers = self._vt(rng) if task == "vt" else self._niah(task, rng)
        head = self.tok(intro if self.intro else "")
        needle_ids = [self.tok(n) for n in needles]
        tail = len(encode_answer(self.tokenizer, question, answers)[0]) + SLACK_PER_ITEM * len(answers)
        region = length - len(head) - tail  # haystack + needles
        room = region - sum(len(n) for n in needle_ids)
        if room < 0:
            raise BadValue(f"{task} at {length} tokens: the template alone needs {length - room} tokens")
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
            raise BadValue(f"the answer in this order needs {-pad} more tokens than the prompt has room for")
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
        head = self.tok(self.words["cwe_intro"] if self.intro else "")
        question = self.words["cwe_question"].format(count=common)
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
            raise BadValue(f"cwe at {length} tokens: the template alone needs {length - room + size} tokens")
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


def pseudo_word(rng: random.Random) -> str:
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    return "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(3))


def word_half(word: str) -> int:
    """0 for the evaluation's half of the pseudo-words, 1 for training's (by the first 6 letters,
    lowercase: a key, a variable name and a common word's stem alike)."""
    return zlib.crc32(word[:6].lower().encode()) & 1


def min_length(builder: Builder, task: str) -> int:
    """The fewest tokens a prompt of `task` can have (its template with no haystack), to 16."""
    for n in range(16, 1 << 20, 16):
        try:
            builder.build(task, n, 0.5, random.Random(0))
            return n
        except ValueError:
            continue
    raise BadValue(f"{task}: no length up to 1M fits its template")


def synthetic_documents(
    tokenizer, tasks, seq_len: int, seed: int, min_tokens: int = 0, digits: int = DIGITS, intro: bool = True
) -> Iterator[list[int]]:
    """An endless stream of training documents, each one task prompt (from training's half of the
    pseudo-words) ending with its answer: token ids, at most seq_len - 1 long so that with its EOS
    it fits one packed sequence. Task, length (from the shortest the task allows, or
    `min_tokens`, to seq_len - 1) and depth are drawn from `seed`; intro=False leaves out the
    task's opening line (shorter prompts, for short stages); raises ValueError when no task fits."""
    if seed == EVAL_SEED:
        raise BadValue(f"seed {seed} is the evaluation's ({EVAL_SEED}); a training source must use another")
    builder = Builder(tokenizer, words="train", digits=digits, intro=intro)
    shortest = {t: max(min_length(builder, t), min_tokens) for t in tasks or TASKS}
    fit = [t for t, n in shortest.items() if n <= seq_len - 1]
    if not fit:
        raise BadValue(
            f"no task of {list(shortest)} fits in {seq_len - 1} tokens (the shortest needs "
            f"{min(shortest.values())}, with min_doc_tokens {min_tokens})"
        )
    rng = random.Random(f"synthetic-{seed}-{seq_len}")
    while True:
        task = rng.choice(fit)
        for _ in range(100):  # near its shortest, a task's words may tokenise longer than min_length's: draw again
            try:
                prompt = builder.build(task, rng.randint(shortest[task], seq_len - 1), rng.random(), rng)
                break
            except ValueError:
                continue
        else:
            raise BadValue(f"{task} did not fit in {seq_len - 1} tokens in 100 draws")
        yield prompt.ids[: prompt.items[-1][1]].tolist()
