"""Tokenise and pack a recipe's data once, to disk; the trainer memory-maps the result.

A prepared stage lives in cache_dir/<split>-<seq_len>-<fingerprint>, where the fingerprint
covers the source (local files by path, size and mtime; a hub dataset by name and split),
the text field, the tokenizer's full definition, the length and the filters. It is built
under a ".partial" name and renamed when complete, with a marker file written last: an
interrupted preparation is detected by its leftover and rebuilt, never read.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from ringpatch.data.packing import pack_documents
from ringpatch.data.tokenizer import load_tokenizer

FORMAT = 2  # 2: a document continued from the previous sequence restarts its positions
MARKER = "ringpatch_prepared.json"
EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


def local_files(source: str) -> tuple[str, list[Path]] | None:
    """(builder, files) for a local file or folder; None when `source` is not on disk (a hub name)."""
    path = Path(source)
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.suffix in EXTENSIONS)
    if not files:
        raise ValueError(f"data source {source} holds no {sorted(EXTENSIONS)} files")
    kinds = {EXTENSIONS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) > 1:
        raise ValueError(f"data source {source} mixes or lacks known file kinds: {sorted({f.suffix for f in files})}")
    return kinds.pop(), files


def load_source(source: str, split: str, text_field: str, streaming: bool):
    """The documents of `source` as a datasets (Iterable)Dataset, checked for `text_field`."""
    import datasets

    local = local_files(source)
    if local is None:
        ds = datasets.load_dataset(source, split=split, streaming=streaming)
    else:
        builder, files = local
        extra = {"sample_by": "document"} if builder == "text" else {}  # a .txt file is one document
        ds = datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", streaming=streaming, **extra
        )
    columns = ds.column_names if ds.column_names is not None else list(next(iter(ds)).keys())
    if text_field not in columns:
        raise ValueError(
            f"data source {source} has no text field {text_field!r}; its fields are {columns}: set data.text_field"
        )
    return ds


def tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{text}|eos={tokenizer.eos_token_id}".encode()).hexdigest()


def fingerprint(spec, source: str, split: str, tokenizer, seq_len: int) -> str:
    local = local_files(source)
    where = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in local[1]] if local else source
    key = {
        "format": FORMAT,
        "source": where,
        "split": split,
        "text_field": spec.text_field,
        "tokenizer": tokenizer_digest(tokenizer),
        "seq_len": seq_len,
        "min_doc_tokens": spec.min_doc_tokens,
        "max_sequences": spec.max_sequences,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _documents(ds, tokenizer, text_field: str, streaming: bool, num_proc: int) -> Iterator[list[int]]:
    def tokenize(batch):
        return {"ids": tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]}

    if streaming:  # serial: a stream has no random access for workers
        for batch in ds.iter(batch_size=256):
            yield from tokenize(batch)["ids"]
        return
    tokens = ds.map(
        tokenize,
        batched=True,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=ds.column_names,
        desc="tokenising",
    )
    for row in tokens:
        yield row["ids"]


def _packed(spec, source: str, split: str, tokenizer, seq_len: int):
    """Generator of packed rows (run by datasets, which writes them to Arrow in batches)."""
    from tqdm.auto import tqdm

    ds = load_source(source, split, spec.text_field, spec.streaming)
    docs = _documents(ds, tokenizer, spec.text_field, spec.streaming, spec.num_proc)
    packed = pack_documents(docs, seq_len, tokenizer.eos_token_id, spec.min_doc_tokens)
    yield from tqdm(islice(packed, spec.max_sequences), desc=f"packing {split} at {seq_len}", unit="seq")


def _tokens_up_to(spec, source: str, split: str, tokenizer, needed: int) -> int:
    """Tokens the kept documents give (with EOS), counting no further than `needed`."""
    ds = load_source(source, split, spec.text_field, spec.streaming)
    count = 0
    for doc in _documents(ds, tokenizer, spec.text_field, True, 1):  # serial: stops early
        count += len(doc) + 1 if len(doc) >= spec.min_doc_tokens else 0
        if count >= needed:
            break
    return count


def prepare_split(spec, source: str, split: str, tokenizer, seq_len: int, kind: str = "train") -> Path:
    """Prepare `source` packed at `seq_len`, or reuse the complete copy with the same fingerprint."""
    import datasets

    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token, which packing puts between documents")
    folder = Path(spec.cache_dir, f"{kind}-{seq_len}-{fingerprint(spec, source, split, tokenizer, seq_len)}")
    if Path(folder, MARKER).is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    for leftover in (partial, folder):
        if leftover.exists():
            print(f"ringpatch: {leftover} is an interrupted preparation; rebuilding it")
            shutil.rmtree(leftover)
    tokens = _tokens_up_to(spec, source, split, tokenizer, seq_len)  # a missing text field fails here too
    if tokens < seq_len:
        raise ValueError(
            f"data source {source} gives {tokens} tokens (documents of at least data.min_doc_tokens="
            f"{spec.min_doc_tokens}, with EOS), fewer than the {seq_len} one packed sequence needs: add data or "
            "lower min_doc_tokens"
        )
    features = datasets.Features(
        {name: datasets.Sequence(datasets.Value("int32")) for name in ("input_ids", "doc_position_ids")}
    )
    kwargs = {"spec": spec, "source": source, "split": split, "tokenizer": tokenizer, "seq_len": seq_len}
    data = datasets.Dataset.from_generator(
        _packed, features=features, gen_kwargs=kwargs, cache_dir=str(partial / "cache")
    )
    data.save_to_disk(str(partial / "data"))
    del data
    shutil.rmtree(partial / "cache")
    Path(partial, MARKER).write_text(json.dumps({"source": source, "split": split, "seq_len": seq_len}))
    partial.rename(folder)  # complete: only now does the fingerprint's folder exist
    return folder


def prepare_shared(spec, source: str, split: str, tokenizer, seq_len: int, kind: str = "train"):
    """prepare_split on rank 0 of the default group while the others wait (cache_dir must be
    shared by the nodes), then every rank memory-maps the result. Without a group: this process."""
    import torch.distributed as dist

    grouped = dist.is_available() and dist.is_initialized()
    if not grouped or dist.get_rank() == 0:
        folder = prepare_split(spec, source, split, tokenizer, seq_len, kind)
    if grouped:
        dist.barrier()
        if dist.get_rank() != 0:  # complete now: only the fingerprint is computed
            folder = prepare_split(spec, source, split, tokenizer, seq_len, kind)
    return load_prepared(folder)


def load_prepared(folder: str | Path):
    """The packed sequences, memory-mapped, as torch tensors."""
    import datasets

    if not Path(folder, MARKER).is_file():
        raise ValueError(f"{folder} is not a complete prepared dataset (no {MARKER}); run ringpatch prepare again")
    return datasets.load_from_disk(str(Path(folder, "data"))).with_format("torch")


def prepare_recipe(recipe) -> list[Path]:
    """Prepare every stage's training data and the held-out data at every length the run and
    its evaluation read; the trainer and `ringpatch eval` then find them by fingerprint."""
    if recipe.data is None:
        raise ValueError("the recipe has no data section (data.source) to prepare")
    spec = recipe.data
    tokenizer = load_tokenizer(recipe.model.tokenizer, recipe.model.name)
    folders = [
        prepare_split(spec, spec.source, spec.split, tokenizer, n, "train")
        for n in sorted({s.seq_len for s in recipe.stages})
    ]
    if spec.eval_source is not None:
        lengths = {s.seq_len for s in recipe.stages} | (
            {max(recipe.eval.ppl_lengths)} if recipe.eval.ppl_lengths else set()
        )
        folders += [
            prepare_split(spec, spec.eval_source, spec.eval_split, tokenizer, n, "eval") for n in sorted(lengths)
        ]
    return folders
