"""The demo corpus: small, generated here, with a dependency that reaches far back.

Every document is a pass-key document: a one-digit key (digits appear nowhere else in the
corpus) is stated at a random depth of filler, asked for once after the rest of the filler,
then asked again several times a sentence or two apart. The short recalls teach the copy
(an attention head that finds the digit) within the first stage's 128 tokens; the long gaps,
in documents of up to 1,000 bytes, are retrievals only an extended context holds. The
evaluation's demo passkey prompts use the same template. Filler comes from a handful of fixed
sentences, so a tiny model learns it fast; keys are fresh in every document.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FILLER = (
    "The grass is green. ",
    "The sky is blue. ",
    "The sun is yellow. ",
    "Here we go. ",
    "There and back again. ",
    "The river runs to the sea. ",
    "A bell rings in the town. ",
    "The road is long and quiet. ",
)
PASSKEY_INTRO = "There is a pass key hidden in this text. "
PASSKEY_QUESTION = "What is the pass key? The pass key="
KEY_DIGITS = "0123456789"  # the pass key's class: one byte token, used nowhere else
RECALLS = (3, 10)  # short-distance recalls after the first answer
RECALL_GAP = 60  # at most this many characters of filler before each


def filler(rng: random.Random, chars: int) -> str:
    """About `chars` characters of filler (whole sentences)."""
    out, n = [], 0
    while n < chars:
        out.append(rng.choice(FILLER))
        n += len(out[-1])
    return "".join(out)


def passkey_line(key: str) -> str:
    return f"The pass key={key}. Remember it. "


def passkey_document(rng: random.Random, chars: int, depth: float, key_length: int = 1) -> str:
    """The key (`key_length` digits) at `depth` of about `chars` of filler, asked for after the
    rest of it, then asked again a few times at short distances."""
    key = "".join(rng.choice(KEY_DIGITS) for _ in range(key_length))
    before = filler(rng, int(chars * depth))
    after = filler(rng, max(0, chars - len(before) - 110))
    recalls = "".join(
        filler(rng, rng.randint(0, RECALL_GAP)) + PASSKEY_QUESTION + key + ". " for _ in range(rng.randint(*RECALLS))
    )
    return PASSKEY_INTRO + before + passkey_line(key) + after + PASSKEY_QUESTION + key + ". " + recalls


def write_corpus(
    folder: str | Path,
    train_docs: int = 6000,
    eval_docs: int = 24,
    chars: tuple[int, int] = (150, 1000),
    eval_chars: int = 5000,
    seed: int = 0,
) -> Path:
    """Write train.jsonl (documents of `chars` characters before their recalls) and eval.jsonl
    (long ones, for perplexity vs length) into `folder`, {"text": ...} per line; idempotent."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for name, count, span in (("train", train_docs, chars), ("eval", eval_docs, (eval_chars, eval_chars))):
        path = folder / f"{name}.jsonl"
        lines = [json.dumps({"text": passkey_document(rng, rng.randint(*span), rng.random())}) for _ in range(count)]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(path)
    return folder
