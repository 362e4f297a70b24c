"""The folders this repository's make targets write, so that a missing one is named with its command."""

from __future__ import annotations

from pathlib import Path

from ringpatch.data import real_model

MADE_BY = {
    real_model.FOLDER: real_model.MAKE,
    "data/real-text": "make real-text",
    "data/demo": "make demo (or python data/make_demo_corpus.py)",
}
"""{folder relative to the repository root: the command that writes it}."""


def made_by(path) -> str:
    """' (made by `make real-model`)' when `path` is one of MADE_BY's folders or inside one, else ''."""
    parts = Path(path).expanduser().absolute().parts
    for folder, command in MADE_BY.items():
        want = Path(folder).parts
        for end in range(len(want), len(parts) + 1):
            if parts[end - len(want) : end] == want:
                return f" (made by `{command}`)"
    return ""
