"""The synthetic retrieval source (data.sources with source: synthetic:ruler): training documents
that never hold an evaluation prompt, whole in their packed sequence, in the mixture's shares, and
bad settings refused before start, naming the source."""

from __future__ import annotations

import json
import random
import re

import pytest
import yaml

from ringpatch.data.packing import pack_documents
from ringpatch.data.prepare import DataError, fingerprint, load_prepared, prepare_split
from ringpatch.data.tasks import EVAL_SEED, TASKS, Builder, min_length, synthetic_documents, word_half
from ringpatch.data.tokenizer import byte_tokenizer
from ringpatch.plan.recipe import DataSpec, from_dict
from tests.helpers.bpe import train_bpe
from tests.helpers.trainrun import corpus, launch, recipe

pytestmark = pytest.mark.unit

# a key or VAR name (6 letters), or the 6-letter stem of a cwe word (8): whole words only
WORD = re.compile(r"\b(?:[bdfgklmnprstvz][aeiou]){3}(?=(?:[bdfgklmnprstvz][aeiou])?\b)", re.IGNORECASE)


def _words(text: str) -> set[str]:
    """Every 3-syllable pseudo-word stem in `text` (keys, VAR names, the stems of cwe's words)."""
    return {w.lower() for w in WORD.findall(text)}


def _eval_prompts(tokenizer, lengths):
    """The evaluation's prompts, built as ruler_scores builds them (its seeds, its words)."""
    builder = Builder(tokenizer)
    for n in lengths:
        for task in TASKS:
            for depth in (0.1, 0.5, 0.9) if task != "cwe" else [None]:
                for trial in range(2):
                    yield builder.build(task, n, depth, random.Random(f"{EVAL_SEED}-{task}-{n}-{depth}-{trial}"))


def _bpe():
    """A GPT-2-style byte-level BPE (words carry their leading space), trained on both halves' words."""
    rng, lines = random.Random(0), []
    for half in ("eval", "train"):
        builder = Builder(byte_tokenizer(), words=half)
        for _ in range(200):
            k, v = builder.word(rng), builder.number(rng)
            lines += [f"The magic number for {k} is {v}. What is the magic number for {k}? It is {v}.",
                      f"VAR {k.upper()} = {v}. Which variables are assigned the value {v}? They are {k.upper()}."]  # fmt: skip
    return train_bpe(lines)


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_no_evaluation_prompt_or_key_appears_in_the_training_documents(kind):
    tokenizer = byte_tokenizer() if kind == "bytes" else _bpe()
    evaluation = list(_eval_prompts(tokenizer, (512, 1024)))
    eval_words = set().union(*(_words(tokenizer.decode(p.ids[: p.tail])) for p in evaluation))
    docs = synthetic_documents(tokenizer, (), 1024, seed=1)
    train_texts = [tokenizer.decode(next(docs)) for _ in range(300)]
    train_words = set().union(*(_words(t) for t in train_texts))
    assert len(eval_words) > 100 and len(train_words) > 1000  # the check has something to find
    assert eval_words.isdisjoint(train_words), sorted(eval_words & train_words)[:10]
    assert {word_half(w) for w in eval_words} == {0} and {word_half(w) for w in train_words} == {1}
    asked = {p.question + " " + ", ".join(p.answers) for p in evaluation}  # each with its keys or values
    assert not any(q in t for q in asked for t in train_texts)
    # the generator's own words, before any decode: every task drew from training's half
    seen = {t: 0 for t in TASKS}
    for text in train_texts:
        seen["cwe" if "most common" in text else "vt" if "VAR " in text else "niah"] = 1
    assert seen["cwe"] and seen["vt"] and seen["niah"]


def test_documents_end_with_their_answer_fit_the_stage_and_follow_the_seed():
    tokenizer = byte_tokenizer()
    docs = synthetic_documents(tokenizer, ("niah_single", "niah_multikey"), 256, seed=3)
    texts = [tokenizer.decode(next(docs)) for _ in range(50)]
    shortest = min_length(Builder(tokenizer, words="train"), "niah_single")
    for t in texts:  # niah_multikey needs 288 tokens: at 256 only niah_single fits
        assert shortest - 4 <= len(t) <= 255 and re.search(r"magic number for (\w+)\? It is (\d{7})$", t), t[-80:]
        key, value = re.search(r"for (\w+)\? It is (\d{7})$", t).groups()
        assert f"The magic number for {key} is {value}." in t  # the answer is in the context
    again = synthetic_documents(tokenizer, ("niah_single", "niah_multikey"), 256, seed=3)
    assert [tokenizer.decode(next(again)) for _ in range(50)] == texts
    other = synthetic_documents(tokenizer, ("niah_single", "niah_multikey"), 256, seed=4)
    assert [tokenizer.decode(next(other)) for _ in range(50)] != texts


def test_whole_documents_are_never_cut_and_the_others_fill_the_room():
    rng = random.Random(0)
    docs = []
    for i in range(3000):
        if rng.random() < 0.4:
            docs.append(([1000 + i] * rng.randrange(100, 255), 1))  # whole: one id per document
        else:
            docs.append(([7] * rng.randrange(10, 900), 0))
    rows = list(pack_documents(docs, 256, 0, sources=2, whole={1}))
    placed = {}
    for r, row in enumerate(rows):
        for token in row["input_ids"]:
            if token >= 1000:
                placed.setdefault(token, set()).add(r)
    whole = {d[0]: len(d) for d, label in docs if label == 1}
    assert len(placed) > 0.95 * len(whole)  # all but the last few (still waiting at the end) are placed
    assert all(len(rows_of) == 1 for rows_of in placed.values())  # each in one sequence
    for row in rows:  # and each from its position 0, with its tokens in a run
        ids, pos = row["input_ids"], row["doc_position_ids"]
        for j, token in enumerate(ids):
            if token >= 1000 and (j == 0 or ids[j - 1] != token):
                assert pos[j] == 0 and ids[j : j + whole[token]] == [token] * whole[token]
    shares = [sum(r["source_tokens"][k] for r in rows) for k in (0, 1)]
    assert sum(shares) == 256 * len(rows)  # no padding: the cut documents fill the room


def _spec(folder, synthetic: dict, weights=(0.7, 0.3), **kw):
    docs = corpus(folder / "docs")
    return from_dict(
        DataSpec,
        {"sources": [{"source": str(docs), "weight": weights[0]},
                     {"source": "synthetic:ruler", "weight": weights[1], **synthetic}],
         "cache_dir": str(folder / "cache"), **kw},
        "data",
    )  # fmt: skip


def test_a_mixture_with_the_synthetic_source_keeps_its_share_and_its_fingerprint(tmp_path):
    spec = _spec(tmp_path, {"tasks": ["niah_single", "niah_multikey"]}, max_sequences=128)
    data = load_prepared(prepare_split(spec, None, "train", byte_tokenizer(), 1024))
    counts = data[:]["source_tokens"]
    share = counts.sum(0).double() / counts.sum()
    assert abs(float(share[1]) - 0.3) < 0.02, share
    text = "".join(byte_tokenizer().decode(row) for row in data[:]["input_ids"].tolist())
    assert text.count("What is the magic number for") > 40
    fp = fingerprint(spec, None, "train", byte_tokenizer(), 1024)
    for change in ({"tasks": ["niah_single"]}, {"tasks": ["niah_single", "niah_multikey"], "seed": 2}):
        assert fingerprint(_spec(tmp_path, change, max_sequences=128), None, "train", byte_tokenizer(), 1024) != fp


@pytest.mark.parametrize(
    "synthetic, extra, message",
    [
        ({"seed": 0}, {}, "seed 0 is the seed of the evaluation's RULER prompts"),
        ({"text_field": "text"}, {}, "synthetic:ruler generates its documents and reads no ['text_field']"),
        ({"tasks": ["niah_single", "niah_single"]}, {}, "tasks names a task twice"),
        ({"tasks": ["niah_double"]}, {}, "data.sources[1].tasks[0] must be one of"),
    ],
)
def test_bad_synthetic_sources_are_refused(tmp_path, synthetic, extra, message):
    with pytest.raises(ValueError) as e:
        _spec(tmp_path, synthetic, **extra)
    assert message in str(e.value), str(e.value)


def test_settings_of_the_generator_on_a_file_source_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\['seed'\] apply to source: synthetic:ruler only"):
        from_dict(DataSpec, {"sources": [{"source": "a.jsonl", "weight": 1, "seed": 3}]}, "data")


def test_only_synthetic_sources_need_max_sequences():
    raw = {"sources": [{"source": "synthetic:ruler", "weight": 1}]}
    with pytest.raises(ValueError, match="never runs out: set data.max_sequences"):
        from_dict(DataSpec, raw, "data")
    assert from_dict(DataSpec, {**raw, "max_sequences": 8}, "data").max_sequences == 8


@pytest.mark.e2e  # torchrun, as a user starts the trainer
def test_a_stage_no_task_fits_is_named_before_start(tmp_path):
    """A stage at 128 tokens with tasks whose templates need 176 and more: the trainer stops in its
    checks, before any process group, naming the source and the length."""
    path = recipe(tmp_path, corpus(tmp_path / "docs"))
    raw = yaml.safe_load(path.read_text())
    source = raw["data"].pop("source")
    raw["data"]["sources"] = [{"source": source, "weight": 0.7},
                              {"source": "synthetic:ruler", "weight": 0.3, "tasks": ["niah_single"]}]  # fmt: skip
    raw["stages"][0]["seq_len"] = 128
    path.write_text(yaml.safe_dump(raw))
    result = launch(path, 2)
    assert result.returncode != 0
    first = result.stderr.strip().splitlines()
    assert any("data.sources[1] synthetic:ruler yields no document for a sequence of 128 tokens" in line
               for line in first), result.stderr[-2000:]  # fmt: skip
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_refusal_is_a_data_error():
    spec = from_dict(DataSpec, {"sources": [{"source": "synthetic:ruler", "weight": 1, "tasks": ["cwe"]}],
                                "max_sequences": 4}, "data")  # fmt: skip
    from ringpatch.data.prepare import synthetic_stream

    with pytest.raises(DataError, match=r"no task of \[.cwe.\] fits in 399 tokens"):
        synthetic_stream(spec, 0, byte_tokenizer(), 400)
    assert json.dumps(spec.sources[0].tasks) == '["cwe"]'


def _two_stage(tmp_path, weights0, weights1=None):
    path = recipe(tmp_path, corpus(tmp_path / "docs"))
    raw = yaml.safe_load(path.read_text())
    source = raw["data"].pop("source")
    raw["data"]["sources"] = [{"source": source, "weight": 0.7},
                              {"source": "synthetic:ruler", "weight": 0.3, "tasks": ["niah_single"]}]  # fmt: skip
    raw["stages"][0]["source_weights"] = weights0
    if weights1 is not None:
        raw["stages"][1]["source_weights"] = weights1
    return raw


def test_a_stage_can_leave_a_source_out_and_reweigh_the_others(tmp_path):
    from ringpatch.plan.recipe import Recipe

    r = from_dict(Recipe, _two_stage(tmp_path, [1, 0], [0.5, 0.5]), "")
    first, second = r.stage_data(0), r.stage_data(1)
    assert [m.source for m in first.sources] == [r.data.sources[0].source]  # the synthetic one left out
    assert [m.weight for m in second.sources] == [0.5, 0.5] and r.data.sources[0].weight == 0.7
    assert fingerprint(second, None, "train", byte_tokenizer(), 256) != fingerprint(r.data, None, "train",
                                                                                    byte_tokenizer(), 256)  # fmt: skip


@pytest.mark.parametrize(
    "weights, message",
    [
        ([1], "has 1 weights for the 2 data.sources"),
        ([0, 0], "at least one > 0"),
        ([-1, 1], "each must be a finite number >= 0"),
        ([float("nan"), 1], "each must be a finite number >= 0"),
        ([0, 1], "keeps only synthetic:ruler, which never runs out: set data.max_sequences"),
    ],
)
def test_bad_stage_weights_are_refused(tmp_path, weights, message):
    from ringpatch.plan.recipe import Recipe

    with pytest.raises((ValueError, TypeError)) as e:
        from_dict(Recipe, _two_stage(tmp_path, weights), "")
    assert message in str(e.value), str(e.value)


def test_values_can_have_fewer_digits_for_a_small_model():
    tokenizer = byte_tokenizer()
    docs = synthetic_documents(tokenizer, ("niah_single",), 512, seed=2, digits=1)
    for _ in range(20):
        text = tokenizer.decode(next(docs))
        key, value = re.search(r"for (\w+)\? It is (\d+)$", text).groups()
        assert len(value) == 1 and f"The magic number for {key} is {value}." in text
    assert Builder(tokenizer).number(random.Random(0)) == Builder(tokenizer, digits=7).number(random.Random(0))
    with pytest.raises(ValueError, match=r"value digits must be an integer in \[1, 18\], got 0"):
        Builder(tokenizer, digits=0)


def test_without_the_intro_a_needle_task_fits_a_short_stage():
    tokenizer = byte_tokenizer()
    with pytest.raises(ValueError, match="no task of"):
        next(synthetic_documents(tokenizer, ("niah_single",), 128, seed=1, digits=1))
    docs = synthetic_documents(tokenizer, ("niah_single", "niah_multikey"), 128, seed=1, digits=1, intro=False)
    for _ in range(20):
        text = tokenizer.decode(next(docs))
        assert len(text) <= 127 and "hidden in the text below" not in text
        key, value = re.search(r"for (\w+)\? It is (\d)$", text).groups()
        assert f"The magic number for {key} is {value}." in text
    with pytest.raises(ValueError, match=r"\['intro'\] apply to source: synthetic:ruler only"):
        from_dict(DataSpec, {"sources": [{"source": "a.jsonl", "weight": 1, "intro": False}]}, "data")
