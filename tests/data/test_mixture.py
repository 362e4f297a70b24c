"""Training mixtures (data.sources): token shares that follow the weights, a preparation that is
the same every time, the realised share in the metrics, and bad mixtures refused before start."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from ringpatch.data.prepare import DataError, check_tokens, fingerprint, load_prepared, mix, prepare_split
from ringpatch.data.tokenizer import byte_tokenizer
from ringpatch.plan.recipe import DataSpec, from_dict
from tests.helpers.trainrun import corpus, launch, ok, recipe

pytestmark = pytest.mark.unit


def _write(path, docs: int, seed: int, letter: str):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(docs):
            f.write(json.dumps({"text": f"{letter}{i} " + letter * rng.randrange(200, 1800)}) + "\n")
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mix")
    return _write(folder / "long.jsonl", 900, 0, "a"), _write(folder / "short.jsonl", 500, 1, "b"), folder


def _mixture(folder, a, b, weights=(0.7, 0.3), **kw):
    return from_dict(
        DataSpec,
        {"sources": [{"source": str(a), "weight": weights[0]}, {"source": str(b), "weight": weights[1]}],
         "cache_dir": str(folder / kw.pop("cache", "cache")), **kw},
        "data",
    )  # fmt: skip


def test_a_70_30_mixture_gives_its_token_shares_and_the_same_sequences_every_time(sources):
    a, b, folder = sources
    spec = _mixture(folder, a, b, max_sequences=256)
    data = load_prepared(prepare_split(spec, None, "train", byte_tokenizer(), 4096))
    counts = data[:]["source_tokens"]
    assert data.num_rows == 256 and int(counts.sum()) == 256 * 4096  # 1M tokens, every one counted once
    share = counts.sum(0).double() / counts.sum()
    # an independent count: each piece of a row up to and with its EOS is one document's (or a cut
    # one's), and its source is the letter it is made of
    ids = data[:]["input_ids"]
    by_letter, unknown = {"a": 0, "b": 0}, 0
    for row in ids.tolist():
        start = 0
        for end in [i + 1 for i, t in enumerate(row) if t == 256] + [len(row)]:
            piece = row[start:end]
            letters = {chr(t) for t in piece if t in (ord("a"), ord("b"))}
            if len(letters) == 1:
                by_letter[letters.pop()] += len(piece)
            else:
                assert not letters, piece  # never two sources in one piece
                unknown += len(piece)
            start = end
    assert unknown <= 1e-4 * ids.numel(), unknown  # a row that begins with a cut document's EOS alone
    counted = by_letter["a"] / (by_letter["a"] + by_letter["b"])
    print(f"token shares over {ids.numel():,} tokens, weights 0.7 / 0.3: {float(share[0]):.4f} / "
          f"{float(share[1]):.4f} (counted from the tokens: {counted:.4f} / {1 - counted:.4f})")  # fmt: skip
    assert abs(counted - float(share[0])) < 1e-3, (counted, share)
    assert abs(float(share[0]) - 0.7) < 0.01 and abs(float(share[1]) - 0.3) < 0.01, share
    again = load_prepared(prepare_split(_mixture(folder, a, b, max_sequences=256, cache="again"), None, "train",
                                        byte_tokenizer(), 4096))  # fmt: skip
    assert torch.equal(again[:]["input_ids"], ids)  # prepared anew: the same documents in the same order
    other = _mixture(folder, a, b, weights=(0.5, 0.5), max_sequences=256)
    assert fingerprint(other, None, "train", byte_tokenizer(), 4096) != fingerprint(spec, None, "train",
                                                                                     byte_tokenizer(), 4096)  # fmt: skip


def test_mix_follows_the_weights_to_the_end_and_stops_when_a_source_runs_out():
    rng = random.Random(0)
    long_docs = [[1] * rng.randrange(10, 500) for _ in range(2000)]
    short_docs = [[2] * rng.randrange(10, 50) for _ in range(300)]
    taken = [0, 0]
    for doc, i in mix([iter(long_docs), iter(short_docs)], [3.0, 1.0]):
        taken[i] += len(doc) + 1
    assert abs(taken[0] / sum(taken) - 0.75) < 0.01  # the short source ran out first: the shares still hold
    assert taken[1] == sum(len(d) + 1 for d in short_docs)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"weights": (-1.0, 1.0)}, "must be a finite number in (0.0, inf), got -1.0"),
        ({"weights": (0.0, 1.0)}, "must be a finite number in (0.0, inf), got 0.0"),
        ({"weights": (float("nan"), 1.0)}, "must be a finite number in (0.0, inf), got nan"),
        ({"weights": ("much", 1.0)}, "data.sources[0].weight must be float, got str 'much'"),
        ({"both": True}, "data needs exactly one of source (one source) and sources"),
        ({"empty": True}, "got neither (an empty sources list counts as none)"),
    ],
)
def test_bad_mixtures_are_refused(sources, change, message):
    a, b, folder = sources
    raw = {"sources": [{"source": str(a), "weight": 0.7}, {"source": str(b), "weight": 0.3}]}
    if "weights" in change:
        for s, w in zip(raw["sources"], change["weights"], strict=True):
            s["weight"] = w
    if change.get("both"):
        raw["source"] = str(a)
    if change.get("empty"):
        raw["sources"] = []
    with pytest.raises((ValueError, TypeError)) as e:
        from_dict(DataSpec, raw, "data")
    assert message in str(e.value), str(e.value)


def test_a_source_without_a_long_enough_document_is_named(sources):
    a, b, folder = sources
    spec = from_dict(
        DataSpec,
        {"sources": [{"source": str(a), "weight": 0.7}, {"source": str(b), "weight": 0.3, "min_doc_tokens": 5000}],
         "cache_dir": str(folder / "cache")},
        "data",
    )  # fmt: skip
    with pytest.raises(DataError, match=rf"data source {b} \(weight 0.3 of 1\) gives 0 tokens in documents of at least "
                                        r"5000 tokens"):  # fmt: skip
        check_tokens(spec, None, "train", byte_tokenizer(), 4096)


@pytest.mark.e2e
def test_the_trainer_logs_the_realised_share_of_each_source(tmp_path):
    a, b = _write(tmp_path / "long.jsonl", 90, 0, "a"), _write(tmp_path / "short.jsonl", 50, 1, "b")  # 5 steps' worth
    data = corpus(tmp_path / "corpus")
    path = recipe(tmp_path, data)
    raw = yaml.safe_load(path.read_text())
    raw["data"].pop("source")
    raw["data"]["sources"] = [{"source": str(a), "weight": 0.7}, {"source": str(b), "weight": 0.3}]
    raw["log_every"] = 1
    path.write_text(yaml.safe_dump(raw))
    ok(launch(path, 2))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    shares = [r["source_share"] for r in records if "source_share" in r]
    assert len(shares) == 5, shares  # every step of both stages
    assert all(abs(sum(s) - 1) < 1e-5 and len(s) == 2 for s in shares), shares
    assert sum(s[0] for s in shares) / len(shares) > 0.5, shares  # a few sequences a step: the 0.7 source leads
