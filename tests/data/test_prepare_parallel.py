"""Preparation over N processes (data.num_proc): the same prepared sequences, byte for byte, and
the same fingerprint, streamed or not; the throughput of 2 processes against 1 is printed."""

from __future__ import annotations

import json
import random
import time

import pytest

from ringpatch.data.prepare import fingerprint, load_prepared, prepare_split
from ringpatch.plan.recipe import DataSpec, from_dict
from tests.helpers.bpe import train_bpe

pytestmark = pytest.mark.multiprocess  # data.num_proc: a pool of worker processes

WORDS = "the of and to in a is that for it as was with be by on not he I this are or his from at which".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) + (str(rng.randrange(100)) if rng.random() < 0.1 else "")
                     for _ in range(rng.randrange(50, 2000))) for _ in range(1500)]  # fmt: skip
    docs[7] = "   "  # a blank document, skipped in every mode
    with open(folder / "docs.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    return folder, train_bpe(docs[:200], vocab_size=400)


def _prepare(folder, tokenizer, streaming: bool, num_proc: int):
    spec = from_dict(DataSpec, {"source": str(folder / "docs.jsonl"), "streaming": streaming, "num_proc": num_proc,
                                "cache_dir": str(folder / f"cache-{streaming}-{num_proc}")}, "data")  # fmt: skip
    started = time.perf_counter()
    data = load_prepared(prepare_split(spec, spec.source, "train", tokenizer, 512))
    return data, time.perf_counter() - started, fingerprint(spec, spec.source, "train", tokenizer, 512)


@pytest.mark.parametrize("streaming", [True, False])
def test_two_processes_prepare_the_same_sequences_as_one(corpus, streaming):
    folder, tokenizer = corpus
    one, t1, f1 = _prepare(folder, tokenizer, streaming, 1)
    two, t2, f2 = _prepare(folder, tokenizer, streaming, 2)
    assert f1 == f2
    assert one.num_rows == two.num_rows > 100
    for column in ("input_ids", "doc_position_ids"):
        assert one[:][column].numpy().tobytes() == two[:][column].numpy().tobytes()
    tokens = one.num_rows * 512
    print(f"\nstreaming={streaming}: {tokens:,} tokens, 1 process {t1:.2f} s, 2 processes {t2:.2f} s, "
          f"ratio {t1 / t2:.2f} (worker start included)")  # fmt: skip
