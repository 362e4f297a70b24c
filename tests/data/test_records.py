"""Valid files the record check must take: what editors and pandas write."""

from __future__ import annotations

import json

import pytest

from ringpatch.data.records import check_records

pytestmark = pytest.mark.unit


def test_a_byte_order_mark_and_a_dictionary_encoded_column_are_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "first"}).encode() + b'\n{"text": "second"}\n')
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"text": "one"}, {"text": "two"}]).encode())
    text = tmp_path / "bom.txt"
    text.write_bytes(b"\xef\xbb\xbfa document")
    table = pa.table({"text": pa.array(["a b", "c d", "a b"]).dictionary_encode()})  # pandas' category dtype
    pq.write_table(table, tmp_path / "category.parquet")
    assert check_records("s", "json", [jsonl, array], "text", "data.text_field").records == 4
    assert check_records("s", "text", [text], "text", "data.text_field").records == 1
    assert check_records("s", "parquet", [tmp_path / "category.parquet"], "text", "data.text_field").records == 3
    numbers = pa.table({"text": pa.array([1, 2, 1]).dictionary_encode()})
    pq.write_table(numbers, tmp_path / "numbers.parquet")
    with pytest.raises(ValueError, match="column .text. holds int64, not text"):
        check_records("s", "parquet", [tmp_path / "numbers.parquet"], "text", "data.text_field")


def test_a_yaml_merge_key_is_yaml_and_a_key_given_twice_is_not(tmp_path):
    from ringpatch.plan.recipe import read_yaml

    path = tmp_path / "r.yaml"
    path.write_text("base: &base {seq_len: 64, steps: 1}\nstages:\n  - <<: *base\n    steps: 3\n")
    assert read_yaml(path)["stages"] == [{"seq_len": 64, "steps": 3}]
    path.write_text("a: 1\na: 2\n")
    with pytest.raises(ValueError, match="key 'a' is given twice"):
        read_yaml(path)


def test_a_long_document_is_tokenised_a_piece_at_a_time_into_the_same_ids():
    """A document longer than PIECE_CHARS is tokenised in pieces cut before whitespace (a 10 MB
    one-line document took 2.2 GB at once); with a byte-level BPE the ids equal the whole text's."""
    from ringpatch.data import prepare
    from tests.helpers.bpe import train_bpe

    tok = train_bpe([f"word{i} and more words" for i in range(200)])
    text = " ".join(f"word{i % 97} and more" for i in range(40_000))  # about 600K characters
    pieces = prepare._pieces(text)
    assert "".join(pieces) == text and max(len(p) for p in pieces) <= prepare.PIECE_CHARS < len(text)
    assert all(p[0].isspace() for p in pieces[1:])
    whole = tok([text], add_special_tokens=False)["input_ids"][0]
    assert prepare._tokenize([text, "short one"], tok) == [
        whole,
        tok("short one", add_special_tokens=False)["input_ids"],
    ]
