"""The demo corpus: small, generated here, with dependencies far longer than a short context.

Each "ledger" document defines a ten-letter code at its start, then runs on in filler and
recalls the code every few sentences, so a recalled code is predictable only by copying an
earlier mention. Some documents hide a pass key in filler and ask for it at the end (the
evaluation's demo passkey prompts use the same template). Filler comes from a handful of fixed
sentences, so a tiny model learns it fast. Codes are fresh in every document (3000 training
documents, about 9.5M bytes, more than the demo reads), so they cannot be memorised.
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
NAMES = ("Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu", "Max", "Nia", "Oz", "Pia")
PASSKEY_INTRO = "There is a pass key hidden in this text. "
PASSKEY_QUESTION = "What is the pass key? The pass key="


def filler(rng: random.Random, chars: int) -> str:
    """About `chars` characters of filler (whole sentences)."""
    out, n = [], 0
    while n < chars:
        out.append(rng.choice(FILLER))
        n += len(out[-1])
    return "".join(out)


# Codes use capitals that no filler sentence starts with, and follow "=", which only codes
# follow: a recalled code is then predictable by copying (an induction head) from the
# definition, however far back it is, and by nothing else.
CODE_LETTERS = "BCDEFGJKLMNOPQRSUVWXYZ"


def passkey_line(key: str) -> str:
    return f"The pass key={key}. Remember it. "


def code(rng: random.Random, length: int = 10) -> str:
    return "".join(rng.choice(CODE_LETTERS) for _ in range(length))


def ledger(rng: random.Random, chars: int) -> str:
    """Codes defined first, then filler with recalls of them at every distance."""
    key = code(rng)
    parts = [f"Ledger. The code={key}. "]
    length = len(parts[0])
    while length < chars:
        parts.append(filler(rng, rng.randint(0, 60)))
        parts.append(f"So the code={key}. ")
        length += len(parts[-2]) + len(parts[-1])
    return "".join(parts)


def passkey_document(rng: random.Random, chars: int, depth: float) -> str:
    key = code(rng)
    before = filler(rng, int(chars * depth))
    after = filler(rng, max(0, chars - len(before) - 80))
    return PASSKEY_INTRO + before + passkey_line(key) + after + PASSKEY_QUESTION + key + "."


def document(rng: random.Random, chars: int) -> str:
    if rng.random() < 0.3:
        return passkey_document(rng, chars, rng.random())
    return ledger(rng, chars)


def write_corpus(
    folder: str | Path,
    train_docs: int = 3000,
    eval_docs: int = 24,
    chars: tuple[int, int] = (1500, 5000),
    seed: int = 0,
) -> Path:
    """Write train.jsonl and eval.jsonl ({"text": ...} per line) into `folder`; idempotent."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for name, count, low in (("train", train_docs, chars[0]), ("eval", eval_docs, chars[1])):
        path = folder / f"{name}.jsonl"
        lines = [json.dumps({"text": document(rng, rng.randint(low, chars[1]))}) for _ in range(count)]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(path)
    return folder
