"""Preparation: sources through datasets, packing to disk, reuse by fingerprint, rebuild after an
interruption, and clear errors for bad data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ringpatch.data.prepare import MARKER, load_prepared, prepare_split
from ringpatch.data.tokenizer import byte_tokenizer
from ringpatch.plan.recipe import DataSpec
from tests.helpers import HANG_S, ROOT

pytestmark = pytest.mark.unit

TEXTS = [f"document {i} " + "abc " * (i * 7 % 40) for i in range(50)]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    return path


def _spec(tmp_path, source, **kw):
    return DataSpec(source=str(source), cache_dir=str(tmp_path / "cache"), **kw)


def _expected(seq_len, min_doc=0):
    tok = byte_tokenizer()
    stream = [t for text in TEXTS if len(text.encode()) >= min_doc for t in [*text.encode(), tok.eos_token_id]]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


POOL = pytest.mark.multiprocess  # num_proc 2: a pool of worker processes


@pytest.mark.parametrize(
    "streaming, min_doc", [pytest.param(False, 0, marks=POOL), (True, 0), pytest.param(False, 60, marks=POOL)]
)
def test_prepared_sequences_are_the_packed_token_stream(tmp_path, jsonl, streaming, min_doc):
    spec = _spec(tmp_path, jsonl, streaming=streaming, min_doc_tokens=min_doc, num_proc=1 if streaming else 2)
    data = load_prepared(prepare_split(spec, spec.source, "train", byte_tokenizer(), 32))
    torch.testing.assert_close(data[:]["input_ids"], _expected(32, min_doc), rtol=0, atol=0)
    positions = data[:]["doc_position_ids"].flatten().tolist()
    eos = data[:]["input_ids"].flatten().tolist()
    starts = [i + 1 for i, t in enumerate(eos) if t == byte_tokenizer().eos_token_id][:-1]
    assert all(positions[i] == 0 for i in starts)  # boundaries: positions restart after every EOS


def test_txt_parquet_and_folders(tmp_path):
    import datasets

    folder = tmp_path / "txt"
    folder.mkdir()
    for i, text in enumerate(TEXTS[:5]):
        (folder / f"{i}.txt").write_text(text + "\nsecond line")  # one document per file
    data = load_prepared(prepare_split(_spec(tmp_path, folder), str(folder), "train", byte_tokenizer(), 16))
    assert data.num_rows == sum(len(t) + 13 for t in TEXTS[:5]) // 16
    parquet = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"body": TEXTS}).to_parquet(str(parquet))
    spec = _spec(tmp_path, parquet, text_field="body")
    assert load_prepared(prepare_split(spec, spec.source, "train", byte_tokenizer(), 32)).num_rows == len(_expected(32))


def test_second_run_reuses_and_changes_rebuild(tmp_path, jsonl):
    spec, tok = _spec(tmp_path, jsonl), byte_tokenizer()
    first = prepare_split(spec, spec.source, "train", tok, 32)
    stamp = (first / MARKER).stat().st_mtime_ns
    assert prepare_split(spec, spec.source, "train", tok, 32) == first and (first / MARKER).stat().st_mtime_ns == stamp
    assert prepare_split(spec, spec.source, "train", tok, 64) != first  # another length
    jsonl.write_text(jsonl.read_text() + json.dumps({"text": "one more document"}) + "\n")
    assert prepare_split(spec, spec.source, "train", tok, 32) != first  # the source changed


def test_an_interrupted_preparation_is_rebuilt_never_read(tmp_path, jsonl, capsys):
    spec, tok = _spec(tmp_path, jsonl), byte_tokenizer()
    done = prepare_split(spec, spec.source, "train", tok, 32)
    shutil.rmtree(done)
    partial = done.with_name(done.name + ".partial")  # what a crash mid-preparation leaves
    (partial / "data").mkdir(parents=True)
    (partial / "data" / "data-00000-of-00001.arrow").write_bytes(b"half")
    with pytest.raises(ValueError, match="not a complete prepared dataset"):
        load_prepared(partial)
    again = prepare_split(spec, spec.source, "train", tok, 32)
    assert "interrupted preparation; rebuilding it" in capsys.readouterr().out
    assert again == done and not partial.exists()
    torch.testing.assert_close(load_prepared(again)[:]["input_ids"], _expected(32), rtol=0, atol=0)


def test_bad_data_is_refused_with_what_is_there(tmp_path, jsonl):
    tok = byte_tokenizer()
    with pytest.raises(
        ValueError, match=r"docs.jsonl, line 1: the record has no field 'content' \(it has \['id', 'text'\]\)"
    ):
        prepare_split(_spec(tmp_path, jsonl, text_field="content"), str(jsonl), "train", tok, 32)
    total = len(_expected(1).flatten())
    with pytest.raises(ValueError, match=rf"gives {total} tokens .* fewer than the 100000 one packed sequence needs"):
        prepare_split(_spec(tmp_path, jsonl), str(jsonl), "train", tok, 100000)
    tok.eos_token = None
    with pytest.raises(ValueError, match="has no EOS token"):
        prepare_split(_spec(tmp_path, jsonl), str(jsonl), "train", tok, 32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"holds no \[.*'.jsonl'.*\] files"):
        prepare_split(_spec(tmp_path, empty), str(empty), "train", byte_tokenizer(), 32)


@pytest.mark.e2e
def test_prepare_command_prepares_every_stage(tmp_path):
    import subprocess
    import sys

    import yaml

    from ringpatch.data.corpus import write_corpus

    data = write_corpus(tmp_path / "corpus", train_docs=20, eval_docs=3, chars=(500, 1500), eval_chars=1500)
    root = ROOT
    tiny = yaml.safe_load((root / "recipes" / "tiny-cpu.yaml").read_text())
    del tiny["data"]["sources"]  # one local source, two stages
    tiny["model"]["name"] = str(root / "data" / "demo-base")  # the recipe moves; its base model stays
    tiny["data"].update(
        source=str(data / "train.jsonl"), eval_source=str(data / "eval.jsonl"), cache_dir=str(tmp_path / "cache")
    )
    tiny["stages"] = [{"seq_len": 128, "steps": 20, "micro_batch": 16}, *tiny["stages"]]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny))
    for command in (
        [sys.executable, "-m", "ringpatch.cli", "prepare", "--recipe", str(path)],
        [sys.executable, "data/prepare.py", "--recipe", str(path)],
    ):
        proc = subprocess.run(command, capture_output=True, text=True, cwd=root, timeout=HANG_S)
        assert proc.returncode == 0, proc.stderr[-3000:]
        names = sorted(Path(line.split()[-1]).name.rsplit("-", 1)[0] for line in proc.stdout.splitlines())
        assert names == ["eval-1024", "eval-128", "train-1024", "train-128"]


@pytest.mark.unit
def test_hidden_files_are_skipped_and_counted(tmp_path):
    """A Jupyter checkpoint (or any file under a dot-folder, or a dot-file) beside the data is not
    read as more data: skipped, and named in the plan's data line."""
    from ringpatch.data.prepare import data_line, hidden_files, local_files
    from ringpatch.plan.recipe import DataSpec

    (tmp_path / "data" / ".ipynb_checkpoints").mkdir(parents=True)
    for name in ("data/train.jsonl", "data/.ipynb_checkpoints/train-checkpoint.jsonl", "data/.draft.jsonl"):
        (tmp_path / name).write_text('{"text": "a"}\n')
    builder, files = local_files(str(tmp_path / "data"))
    assert files == [tmp_path / "data" / "train.jsonl"]
    assert [f.name for f in hidden_files(str(tmp_path / "data"))] == [".draft.jsonl", "train-checkpoint.jsonl"]
    line = data_line(DataSpec(source=str(tmp_path / "data")))
    assert "(1 file, 2 hidden skipped (" in line and ".draft.jsonl" in line
    assert local_files(str(tmp_path / "data" / ".draft.jsonl"))[1] == [
        tmp_path / "data" / ".draft.jsonl"
    ]  # named: read
