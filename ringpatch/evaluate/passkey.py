"""Passkey retrieval: a key hidden at a depth of filler, asked for at the end, scored by greedy decoding."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ringpatch.attention.layout import DEFAULT_LAYOUT, Layout
from ringpatch.data import corpus
from ringpatch.data.tasks import LANDMARK_FILLER
from ringpatch.evaluate.prefill import ring_prefill_scores


@dataclass(frozen=True)
class PasskeyTemplate:
    intro: str
    filler: tuple[str, ...]
    needle: str  # with {key}
    question: str
    key_alphabet: str
    key_length: int


# Mohtashami & Jaggi 2023 ("Landmark Attention"), as LongLoRA and EasyContext use it.
CLASSIC = PasskeyTemplate(
    intro="There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there. ",
    filler=(LANDMARK_FILLER,),
    needle="The pass key is {key}. Remember it. {key} is the pass key. ",
    question="What is the pass key? The pass key is ",
    key_alphabet="0123456789",
    key_length=5,
)


def demo_template() -> PasskeyTemplate:
    return PasskeyTemplate(
        corpus.PASSKEY_INTRO,
        corpus.FILLER,
        corpus.passkey_line("{key}"),
        corpus.PASSKEY_QUESTION,
        corpus.KEY_DIGITS,
        1,
    )


def passkey_prompt(tokenizer, template: PasskeyTemplate, length: int, depth: float, rng: random.Random):
    """(ids (length,), number of key tokens at the end): intro, filler, the needle at `depth`
    of the filler, more filler, the question and the key."""
    key = "".join(rng.choice(template.key_alphabet) for _ in range(template.key_length))

    def tok(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    intro, needle = tok(template.intro), tok(template.needle.format(key=key))
    question, answer = tok(template.question), tok(key)
    room = length - len(intro) - len(needle) - len(question) - len(answer)
    if room < 0:
        raise ValueError(f"passkey length {length} is shorter than the prompt without filler ({length - room} tokens)")
    filler: list[int] = []
    while len(filler) < room:
        filler += tok("".join(rng.choice(template.filler) for _ in range(64)))
    before = round(depth * room)
    ids = intro + filler[:before] + needle + filler[before:room] + question + answer
    return torch.tensor(ids), len(answer)


def passkey_accuracy(
    model,
    tokenizer,
    lengths,
    depths,
    trials: int,
    template: PasskeyTemplate,
    group=None,
    layout: Layout = DEFAULT_LAYOUT,
    seed: int = 0,
    device=None,
) -> dict[tuple[int, float], float]:
    """Fraction of trials whose key greedy decoding reproduces, per (length, depth). Scored by
    teacher forcing in one prefill: greedy decoding emits the key exactly when every key
    token is the argmax given the prompt and the key tokens before it."""
    accuracy = {}
    for n in lengths:
        for depth in depths:
            rng = random.Random(f"{seed}-{n}-{depth}")
            hits = 0
            for _ in range(trials):
                ids, k = passkey_prompt(tokenizer, template, n, depth, rng)
                scored = torch.arange(n - k - 1, n - 1, device=device)
                _, correct = ring_prefill_scores(model, ids[None].to(device), scored, group, layout)
                hits += int(correct.all().item())
            accuracy[(n, depth)] = hits / trials
    return accuracy
