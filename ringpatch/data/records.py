"""A local data source checked record by record before anything reads it for training.

Each record must hold its text field as a string: a record that lacks it, holds null, a number or
a list, is not a JSON object, or is not UTF-8 stops the run with the file, the line (or row) and
the field named. Blank records (empty or whitespace only) are counted: they are skipped when the
data is packed, and a source with more than BLANK_LIMIT of them is refused (it usually means the
wrong field, or a broken export). One pass over the files, streamed (a JSON array is read whole,
as the datasets json reader does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ringpatch.errors import BadValue

BOM = b"\xef\xbb\xbf"
BLANK_LIMIT = 0.10
"""The largest share of blank records a source may hold."""


class RecordError(BadValue):
    """A record of a local source that cannot be trained on, with its file and line."""


@dataclass
class RecordCount:
    records: int = 0
    blank: int = 0


def _check_text(where: str, record, field: str, key: str, count: RecordCount) -> None:
    if not isinstance(record, dict):
        raise RecordError(
            f"{where}: a record must be a JSON object with a {field!r} field, got {type(record).__name__}"
        )
    if field not in record:
        fields = sorted(record)[:8]
        raise RecordError(f"{where}: the record has no field {field!r} (it has {fields}); fix the file or set {key}")
    text = record[field]
    if not isinstance(text, str):
        shown = "null" if text is None else f"{type(text).__name__} {str(text)[:40]!r}"
        raise RecordError(f"{where}: field {field!r} holds {shown}, not text; fix the record or remove it")
    count.records += 1
    count.blank += not text.strip()


def _json_records(path: Path, field: str, key: str, count: RecordCount) -> None:
    # "utf-8-sig": a byte-order mark at the start (what some editors write) is UTF-8's, not data
    with path.open("rb") as f:
        first = f.read(1024).removeprefix(BOM).lstrip()[:1]
    if first == b"[":  # one JSON array
        try:
            items = json.loads(path.read_text(encoding="utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RecordError(f"{path}: not a valid UTF-8 JSON array ({e})") from None
        for i, item in enumerate(items):
            _check_text(f"{path}, record {i + 1}", item, field, key, count)
        return
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
            except UnicodeDecodeError as e:
                raise RecordError(f"{path}, line {number}: not UTF-8 ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}, line {number}: not valid JSON ({e.msg}, column {e.colno})") from None
            _check_text(f"{path}, line {number}", record, field, key, count)


def _text_file(path: Path, count: RecordCount) -> None:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    count.records += 1
    count.blank += not text.strip()


def _is_text(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _parquet(path: Path, field: str, key: str, count: RecordCount) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=None)
    if field not in table.column_names:
        raise RecordError(f"{path}: no column {field!r} (it has {table.column_names[:8]}); set {key}")
    column = table.column(field)
    if pa.types.is_dictionary(column.type) and _is_text(column.type.value_type):  # pandas' category: the strings
        column = column.cast(column.type.value_type)
    if not _is_text(column.type):
        raise RecordError(f"{path}: column {field!r} holds {column.type}, not text")
    if column.null_count:
        row = next(i for i, value in enumerate(column.to_pylist()) if value is None)
        raise RecordError(f"{path}, row {row + 1}: field {field!r} holds null, not text; fix the record or remove it")
    for text in column.to_pylist():
        count.records += 1
        count.blank += not text.strip()


def check_records(source: str, builder: str, files: list[Path], field: str, key: str) -> RecordCount:
    """Every record of a local source (builder: json, text or parquet, as prepare.local_files
    says); key: the recipe key that names the field, for the messages."""
    count = RecordCount()
    for path in files:
        if builder == "json":
            _json_records(path, field, key, count)
        elif builder == "text":
            _text_file(path, count)
        else:
            _parquet(path, field, key, count)
    if count.records and count.blank > BLANK_LIMIT * count.records:
        raise RecordError(
            f"data source {source}: {count.blank} of its {count.records} records are empty or whitespace only (more "
            f"than {BLANK_LIMIT:.0%}); check {key} and the files"
        )
    return count
