"""The demo corpus is pinned: `make demo`'s figures in README and docs/measurements.md were measured
on these bytes, and the demo's retrieval skill is sensitive to every detail of its data, so a
change to the generator (or to Python's seeded random) must show up here, not as a different demo."""

import hashlib
import json

import pytest

from ringpatch.data.corpus import KEY_DIGITS, write_corpus

pytestmark = pytest.mark.unit

# sha256 and size of each file write_corpus(folder) writes with its defaults (seed 0), as
# data/make_demo_corpus.py does for `make demo`
PINNED = {
    "train.jsonl": ("efc64684cf339f622d4921da488da4aa9a307474f40911cd8f4c0f380f89b4fd", 6775788),
    "eval.jsonl": ("6ed4ca9e68acee77cd3e17fc9b7cdc803b9e556c3655b15f45a7e7cdfd9efaf8", 133202),
}


def test_demo_corpus_bytes_are_pinned(tmp_path):
    folder = write_corpus(tmp_path)
    for name, (digest, size) in PINNED.items():
        data = (folder / name).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (digest, size), (
            f"{name} changed: the demo's measured figures no longer describe it; rerun `make demo` and "
            "bench/demo_seeds.py, update README and docs/measurements.md, then this pin"
        )


def test_demo_corpus_keys_are_the_only_digits(tmp_path):
    """The corpus's premise: each document's digits are its one key (asked for after it), nothing else."""
    folder = write_corpus(tmp_path, train_docs=200, eval_docs=5)
    for line in (folder / "train.jsonl").read_text().splitlines():
        text = json.loads(line)["text"]
        digits = {c for c in text if c.isdigit()}
        assert len(digits) == 1 and digits <= set(KEY_DIGITS), text[:80]
        key = digits.pop()
        assert f"The pass key={key}. Remember it." in text and text.endswith(f"The pass key={key}. ")
