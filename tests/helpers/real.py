"""The real pretrained model (SmolLM2-135M-Instruct, made once by `make real-model`) and real text
for it: Python's documentation, which every Python carries (pydoc_data), so nothing is downloaded."""

from __future__ import annotations

import pytest

from tests.helpers import ROOT

FOLDER = ROOT / "data" / "smollm2-135m-instruct"


def real_model_folder():
    """The converted folder; the test fails with one line naming `make real-model` when it is missing."""
    from ringpatch.data.real_model import check_folder

    try:
        return check_folder(FOLDER)
    except (FileNotFoundError, ValueError) as e:
        pytest.fail(str(e), pytrace=False)


def documentation() -> list[str]:
    """Python's documentation topics, in name order: real English prose with code, one text each."""
    from pydoc_data.topics import topics

    return [f"# {name}\n{topics[name].strip()}\n" for name in sorted(topics)]


def real_ids(tokenizer, tokens: int) -> list[int]:
    """The first `tokens` tokens of the documentation, one text."""
    ids = tokenizer("\n".join(documentation()), add_special_tokens=False)["input_ids"]
    assert len(ids) >= tokens, f"the documentation has {len(ids)} tokens, fewer than {tokens}"
    return ids[:tokens]


def real_documents(tokenizer, tokens: int, skip: int = 0) -> list[list[int]]:
    """Whole documentation topics (after the first `skip`), as many as fill `tokens` tokens, the last
    cut to fit: real document boundaries for packing."""
    docs, total = [], 0
    for text in documentation()[skip:]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: tokens - total]
        docs.append(ids)
        total += len(ids)
        if total == tokens:
            return docs
    raise AssertionError(f"the documentation holds fewer than {tokens} tokens after {skip} topics")
