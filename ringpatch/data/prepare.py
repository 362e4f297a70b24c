"""Tokenise and pack a recipe's data once, to disk; the trainer memory-maps the result.

A prepared stage lives in cache_dir/<split>-<seq_len>-<fingerprint>, where the fingerprint
covers the source (local files by path, size and mtime; a hub dataset by name and split),
the text field, the tokenizer's full definition, the length and the filters. It is built
under a ".partial" name and renamed when complete, with a marker file written last: an
interrupted preparation is detected by its leftover and rebuilt, never read.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import itertools
import json
import os
import shutil
import stat
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from ringpatch.data.packing import pack_documents
from ringpatch.data.tasks import DIGITS, SYNTHETIC, synthetic_documents
from ringpatch.data.tokenizer import load_tokenizer
from ringpatch.errors import BadValue


class DataError(BadValue):
    """A data source that cannot serve the recipe, in words (see count_tokens)."""


FORMAT = 4  # 2: a document continued from the previous sequence restarts its positions; 3: blank documents skipped;
# 4: documents longer than PIECE_CHARS tokenised a piece at a time
MARKER = "ringpatch_prepared.json"
EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


def _hidden(f: Path, folder: Path) -> bool:
    """A file under `folder` whose path below it has a part starting with "." (.ipynb_checkpoints/,
    .git/, an editor's .#backup): a copy or a tool's file, not a document the user meant."""
    return any(part.startswith(".") for part in f.relative_to(folder).parts)


def hidden_files(source: str) -> list[Path]:
    """The data files under a source folder that local_files skips as hidden (none for a file)."""
    path = Path(source)
    if not path.is_dir():
        return []
    return sorted(f for f in path.rglob("*") if f.suffix in EXTENSIONS and _hidden(f, path))


def special_kind(path: Path) -> str:
    """What a path that is neither a file nor a folder is, in words."""
    mode = path.stat().st_mode
    kinds = ((stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "special file")


def unresolved_link(source: str) -> str:
    """The words for a symbolic link that leads nowhere: a loop, or a target that is gone."""
    try:
        os.stat(source)
    except OSError as e:
        why = (
            "loops back on itself"
            if e.errno == errno.ELOOP
            else f"points at {os.readlink(source)}, which does not exist"
        )
    else:
        why = "cannot be followed"
    return f"data source {source} is a symbolic link that {why}; point it at a file or folder of documents"


def data_line(spec) -> str:
    """The plan's line for the data: each source, with how many files it reads and how many hidden
    ones it skips (a Jupyter checkpoint beside the data would otherwise train twice)."""
    named = [("train", spec.source)] if spec.source else [("train", m.source) for m in spec.sources]
    if spec.eval_source:
        named.append(("held out", spec.eval_source))
    parts = []
    for kind, source in named:
        found = local_files(source) if source != SYNTHETIC else None
        if found is None:
            parts.append(f"{kind} {source}")
            continue
        hidden = hidden_files(source)
        skipped = f", {len(hidden)} hidden skipped ({', '.join(str(f) for f in hidden[:2])})" if hidden else ""
        parts.append(f"{kind} {source} ({len(found[1])} file{'s' if len(found[1]) > 1 else ''}{skipped})")
    return "data: " + "; ".join(parts)


def local_files(source: str) -> tuple[str, list[Path]] | None:
    """(builder, files) for a local file or folder, hidden files and folders skipped (hidden_files);
    None when `source` is not on disk (a hub name)."""
    path = Path(source)
    if path.is_symlink() and not path.exists():
        raise DataError(unresolved_link(source))
    if not path.exists():
        return None
    if not path.is_file() and not path.is_dir():
        raise DataError(f"data source {source} is a {special_kind(path)}, not a file or folder of documents")
    if path.is_file():
        files = [path]
    else:
        files = sorted(f for f in path.rglob("*") if f.suffix in EXTENSIONS and not _hidden(f, path))
    if not files:
        raise DataError(f"data source {source} holds no {sorted(EXTENSIONS)} files")
    kinds = {EXTENSIONS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) > 1:
        raise DataError(f"data source {source} mixes or lacks known file kinds: {sorted({f.suffix for f in files})}")
    return kinds.pop(), files


def text_field_of(spec, kind: str) -> tuple[str, str]:
    """(the text field, the recipe key that names it) of the train or the eval source."""
    if kind == "eval" and spec.eval_text_field is not None:
        return spec.eval_text_field, "data.eval_text_field"
    return spec.text_field, "data.text_field" if kind == "train" else "data.eval_text_field (or data.text_field)"


def check_split(source: str, split: str, key: str) -> None:
    """A local file or folder has one split, "train" (what datasets calls it): any other is refused."""
    if split != "train" and local_files(source) is not None:
        raise DataError(
            f"{key} {split!r}: the local source {source} has one split, 'train'; to hold documents out, give them as "
            "data.eval_source (a file or folder of their own), or use a hub dataset with that split"
        )


def load_source(
    source: str,
    split: str,
    text_field: str,
    streaming: bool,
    cache_dir: str | None = None,
    key: str = "data.text_field",
):
    """The documents of `source` as a datasets (Iterable)Dataset, checked for `text_field`.
    Non-streaming, datasets converts the source to Arrow under `cache_dir` (None: its own
    cache in ~/.cache/huggingface, which keeps the copy)."""
    import datasets

    local = local_files(source)
    if local is None:
        ds = datasets.load_dataset(source, split=split, streaming=streaming, cache_dir=cache_dir)
    else:
        builder, files = local
        empty = [str(f) for f in files if f.stat().st_size == 0]
        if empty:
            raise DataError(f"data source {source}: {empty} {'is' if len(empty) == 1 else 'are'} empty; remove or fill")
        extra = {"sample_by": "document"} if builder == "text" else {}  # a .txt file is one document
        ds = datasets.load_dataset(
            builder,
            data_files=[str(f) for f in files],
            split="train",
            streaming=streaming,
            cache_dir=cache_dir,
            **extra,
        )
    columns = ds.column_names if ds.column_names is not None else list(next(iter(ds)).keys())
    if text_field not in columns:
        raise DataError(f"data source {source} has no text field {text_field!r}; its fields are {columns}: set {key}")
    return ds


def tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{text}|eos={tokenizer.eos_token_id}".encode()).hexdigest()


def mixed(spec, kind: str) -> bool:
    """Whether `kind`'s data is a mixture (data.sources): the training data only."""
    return kind == "train" and bool(spec.sources)


def members(spec) -> list[tuple[object, float]]:
    """The training sources, each as a one-source data spec (its own source, split, text field and
    filter) with its weight; without data.sources, the spec itself with weight 1."""
    if not spec.sources:
        return [(spec, 1.0)]
    return [
        (
            dataclasses.replace(
                spec,
                source=m.source,
                sources=(),
                text_field=m.text_field or spec.text_field,
                split=m.split or spec.split,
                min_doc_tokens=spec.min_doc_tokens if m.min_doc_tokens is None else m.min_doc_tokens,
            ),
            m.weight,
        )
        for m in spec.sources
    ]


def describe(spec, source: str | None, kind: str = "train") -> str:
    """How messages name the data: the source, or the mixture's sources."""
    if mixed(spec, kind):
        return "the data.sources mixture (" + ", ".join(m.source for m, _ in members(spec)) + ")"
    return str(source)


def _where(source: str):
    local = local_files(source)
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in local[1]] if local else source


def fingerprint(spec, source: str | None, split: str, tokenizer, seq_len: int, kind: str = "train") -> str:
    key = {
        "format": FORMAT,
        "tokenizer": tokenizer_digest(tokenizer),
        "seq_len": seq_len,
        "max_sequences": spec.max_sequences,
    }
    if mixed(spec, kind):
        key["mixture"] = [
            [_where(m.source), m.split, m.text_field, m.min_doc_tokens, w, MIX_RULE, *_generator(spec, i)]
            for i, (m, w) in enumerate(members(spec))
        ]
    else:
        key |= {
            "source": _where(source),
            "split": split,
            "text_field": text_field_of(spec, kind)[0],
            "min_doc_tokens": spec.min_doc_tokens,
        }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _generator(spec, i: int) -> list:
    """What makes the documents of data.sources[i] when it is synthetic (part of the fingerprint)."""
    m = spec.sources[i]
    if m.source != SYNTHETIC:
        return []
    return [SYNTHETIC_RULE, list(m.tasks), *_generator_settings(m)]


SYNTHETIC_RULE = "ruler-tasks-2"  # how tasks.synthetic_documents draws its documents (2: RULER's wording)


def _generator_settings(m) -> tuple[int, int, bool]:
    """(seed, value digits, intro) of a synthetic source, its unset keys at their defaults."""
    return (1 if m.seed is None else m.seed), (m.value_digits or DIGITS), m.intro is not False


def synthetic_stream(spec, i: int, tokenizer, seq_len: int):
    """The documents of data.sources[i], the synthetic generator; a DataError naming the source
    when none of its tasks fits in a sequence of seq_len."""
    m = spec.sources[i]
    least = spec.min_doc_tokens if m.min_doc_tokens is None else m.min_doc_tokens
    seed, digits, intro = _generator_settings(m)
    docs = synthetic_documents(tokenizer, m.tasks, seq_len, seed, least, digits, intro)
    try:
        first = next(docs)
    except ValueError as e:
        raise DataError(
            f"data.sources[{i}] {SYNTHETIC} yields no document for a sequence of {seq_len} tokens: {e}; choose tasks "
            "that fit (eval's min_length), lower its min_doc_tokens, or train it only with longer stages"
        ) from None
    return itertools.chain([first], docs)


MIX_RULE = "token-deficit-1"  # how mix() interleaves: part of a mixture's fingerprint


def mix(streams, weights) -> Iterator[tuple[list[int], int]]:
    """(document, source index) from each stream in turn, so that each source's share of the
    tokens (EOS included) follows its weight: the next document comes from the source furthest
    below its share (ties: the first). Deterministic, so a prepared mixture is the same on every
    machine. Stops when a source runs out, so that the shares hold to the end."""
    total = float(sum(weights))
    shares = [w / total for w in weights]
    taken = [0] * len(streams)
    while True:
        everything = sum(taken)
        i = max(range(len(streams)), key=lambda j: (shares[j] * everything - taken[j], -j))
        doc = next(streams[i], None)
        if doc is None:
            return
        taken[i] += len(doc) + 1
        yield doc, i


def _texts(batch: dict, text_field: str) -> list[str]:
    return [text for text in batch[text_field] if isinstance(text, str) and text.strip()]


PIECE_CHARS = 100_000
"""The longest text handed to the tokenizer at once. A fast tokenizer holds about 200 bytes per
character of its input while it works (a 10 MB one-line document took 2.2 GB; a 200 MB one
aborted), so a longer document is tokenised a piece at a time, cut where whitespace begins (where
the pre-tokenizers of byte-level BPE tokenizers split anyway), and its pieces' ids joined."""


def _pieces(text: str) -> list[str]:
    """`text` cut into pieces of at most about PIECE_CHARS, each cut just before whitespace when the
    piece holds any (else at the limit)."""
    pieces, start = [], 0
    while len(text) - start > PIECE_CHARS:
        end = start + PIECE_CHARS
        cut = max(text.rfind(c, start + 1, end) for c in " \n\t")
        end = cut if cut > start else end
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def _tokenize(texts: list[str], tokenizer) -> list[list[int]]:
    if not texts:
        return []
    if all(len(t) <= PIECE_CHARS for t in texts):
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[i for piece in _pieces(t) for i in tokenizer(piece, add_special_tokens=False)["input_ids"]] for t in texts]


_WORKER_TOKENIZER = None


def _start_worker(tokenizer) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the workers are the parallelism
    _WORKER_TOKENIZER = tokenizer


def _tokenize_in_worker(texts: list[str]) -> list[list[int]]:
    return _tokenize(texts, _WORKER_TOKENIZER)


def _in_order(batches: Iterator[list[str]], tokenizer, processes: int) -> Iterator[list[list[int]]]:
    """Each batch tokenised by one of `processes` workers, yielded in the batches' order; at most
    2 x processes batches are read ahead, so a stream larger than memory stays a stream. The
    workers are spawned (the trainer's process has threads a fork would copy mid-state)."""
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_start_worker, initargs=(tokenizer,)) as pool:
        pending: deque = deque()
        for texts in batches:
            pending.append(pool.submit(_tokenize_in_worker, texts))
            if len(pending) >= 2 * processes:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _documents(ds, tokenizer, text_field: str, streaming: bool, num_proc: int) -> Iterator[list[int]]:
    """Each document's token ids, in the source's order whatever num_proc is; blank documents
    (empty or whitespace only: records.py counts them) are skipped."""
    if streaming:
        batches = (_texts(batch, text_field) for batch in ds.iter(batch_size=256))
        tokenised = (
            _in_order(batches, tokenizer, num_proc) if num_proc > 1 else (_tokenize(t, tokenizer) for t in batches)
        )
        for ids in tokenised:
            yield from ids
        return
    tokens = ds.map(
        lambda batch: {"ids": _tokenize(_texts(batch, text_field), tokenizer)},
        batched=True,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=ds.column_names,
        desc="tokenising",
    )
    for row in tokens:
        yield row["ids"]


def _packed(spec, source: str | None, split: str, tokenizer, seq_len: int, cache_dir: str, kind: str = "train"):
    """Generator of packed rows (run by datasets, which writes them to Arrow in batches); a
    mixture's rows also count their tokens from each source (source_tokens)."""
    from tqdm.auto import tqdm

    if mixed(spec, kind):
        streams, weights = [], []
        for i, (m, weight) in enumerate(members(spec)):
            weights.append(weight)
            if m.source == SYNTHETIC:
                streams.append(synthetic_stream(spec, i, tokenizer, seq_len))
                continue
            ds = load_source(m.source, m.split, m.text_field, m.streaming, cache_dir=f"{cache_dir}/{i}",
                             key="data.sources[].text_field")  # fmt: skip
            docs = _documents(ds, tokenizer, m.text_field, m.streaming, m.num_proc)
            streams.append(doc for doc in docs if len(doc) >= m.min_doc_tokens)
        whole = {i for i, m in enumerate(spec.sources) if m.source == SYNTHETIC}  # a question needs its context
        packed = pack_documents(
            mix(streams, weights), seq_len, tokenizer.eos_token_id, sources=len(streams), whole=whole
        )
    else:
        field, key = text_field_of(spec, kind)
        ds = load_source(source, split, field, spec.streaming, cache_dir=cache_dir, key=key)
        docs = _documents(ds, tokenizer, field, spec.streaming, spec.num_proc)
        packed = pack_documents(docs, seq_len, tokenizer.eos_token_id, spec.min_doc_tokens)
    yield from tqdm(islice(packed, spec.max_sequences), desc=f"packing {split} at {seq_len}", unit="seq")


def count_tokens(spec, source: str, split: str, tokenizer, needed: int, kind: str = "train") -> int:
    """Tokens the kept documents of `source` give (with EOS), counting no further than `needed`.
    Streamed (nothing is copied to disk); a source datasets cannot read is a DataError (datasets'
    own error log is silenced meanwhile: the message names the source and the reader's error)."""
    from datasets.utils import logging as ds_logging

    count, verbosity = 0, ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        field, key = text_field_of(spec, kind)
        ds = load_source(source, split, field, streaming=True, key=key)
        for doc in _documents(ds, tokenizer, field, True, 1):  # serial: stops early
            count += len(doc) + 1 if len(doc) >= spec.min_doc_tokens else 0
            if count >= needed:
                break
    except DataError:
        raise
    except Exception as e:  # datasets' and pyarrow's many reader errors: one line, the source named
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(
            f"data source {source} could not be read ({type(e).__name__}: {detail}); check the file"
        ) from None
    finally:
        ds_logging.set_verbosity(verbosity)
    return count


def check_tokens(spec, source: str | None, split: str, tokenizer, seq_len: int, kind: str = "train") -> None:
    """Every record of a local source has its text field as text, and the source gives at least
    one packed sequence of `seq_len` tokens. A mixture: each local source gives at least its share
    of one sequence (hub sources are checked when prepared)."""
    from ringpatch.data.records import check_records

    if mixed(spec, kind):
        total = sum(w for _, w in members(spec))
        for i, (m, weight) in enumerate(members(spec)):
            if m.source == SYNTHETIC:
                synthetic_stream(spec, i, tokenizer, seq_len)
                continue
            check_split(m.source, m.split, "data.sources[].split")
            local = local_files(m.source)
            if local is None:
                continue
            check_records(m.source, *local, m.text_field, "data.sources[].text_field")
            needed = max(1, -(-seq_len * weight // total))
            tokens = count_tokens(m, m.source, m.split, tokenizer, needed)
            if tokens < needed:
                raise DataError(
                    f"data source {m.source} (weight {weight:g} of {total:g}) gives {tokens} tokens in documents of "
                    f"at least {m.min_doc_tokens} tokens (with EOS), fewer than its share of one packed sequence of "
                    f"{seq_len} ({int(needed)}): add data, lower its min_doc_tokens or its weight"
                )
        return
    check_split(source, split, "data.split" if kind == "train" else "data.eval_split")
    local = local_files(source)
    if local is not None:
        field, key = text_field_of(spec, kind)
        check_records(source, *local, field, key)
    tokens = count_tokens(spec, source, split, tokenizer, seq_len, kind)
    if tokens < seq_len:
        raise DataError(
            f"data source {source} gives {tokens} tokens (documents of at least data.min_doc_tokens="
            f"{spec.min_doc_tokens}, with EOS), fewer than the {seq_len} one packed sequence needs: add data or "
            "lower min_doc_tokens"
        )


def prepared_folder(spec, source: str, split: str, tokenizer, seq_len: int, kind: str) -> Path:
    """Where prepare_split keeps `source` packed at `seq_len` (complete when it holds MARKER)."""
    return Path(spec.cache_dir, f"{kind}-{seq_len}-{fingerprint(spec, source, split, tokenizer, seq_len, kind)}")


def prepare_split(spec, source: str, split: str, tokenizer, seq_len: int, kind: str = "train") -> Path:
    """Prepare `source` packed at `seq_len`, or reuse the complete copy with the same fingerprint."""
    import datasets

    if tokenizer.eos_token_id is None:
        raise BadValue(f"tokenizer {tokenizer.name_or_path!r} has no EOS token, which packing puts between documents")
    folder = prepared_folder(spec, source, split, tokenizer, seq_len, kind)
    if Path(folder, MARKER).is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    for leftover in (partial, folder):
        if leftover.exists():
            print(f"ringpatch: {leftover} is an interrupted preparation; rebuilding it")
            shutil.rmtree(leftover)
    check_tokens(spec, source, split, tokenizer, seq_len, kind)  # a missing text field fails here too
    columns = ("input_ids", "doc_position_ids", *(("source_tokens",) if mixed(spec, kind) else ()))
    features = datasets.Features({name: datasets.Sequence(datasets.Value("int32")) for name in columns})
    kwargs = {"spec": spec, "source": source, "split": split, "tokenizer": tokenizer, "seq_len": seq_len, "kind": kind}
    kwargs["cache_dir"] = str(partial / "source")  # datasets' Arrow copy of the source, removed below
    try:
        data = datasets.Dataset.from_generator(
            _packed, features=features, gen_kwargs=kwargs, cache_dir=str(partial / "cache")
        )
        data.save_to_disk(str(partial / "data"))
        del data
        shutil.rmtree(partial / "cache")
        shutil.rmtree(partial / "source", ignore_errors=True)
        Path(partial, MARKER).write_text(json.dumps({"source": describe(spec, source, kind), "split": split,
                                                     "seq_len": seq_len}))  # fmt: skip
    except Exception as e:  # nothing half-written stays; a full disk or a failed write is one line
        shutil.rmtree(partial, ignore_errors=True)
        cause = _os_error(e)
        if cause is None:
            raise
        if cause.errno == errno.ENOSPC:
            raise DataError(
                f"the disk holding {spec.cache_dir} is full while preparing {describe(spec, source, kind)} at {seq_len} "
                "tokens; the partial "
                f"copy {partial} was removed: free space (or set data.cache_dir to a larger disk) and run again"
            ) from None
        raise DataError(
            f"preparing {describe(spec, source, kind)} into {partial} failed ({cause}); the partial copy was removed"
        ) from None
    partial.rename(folder)  # complete: only now does the fingerprint's folder exist
    release_heap()
    return folder


def release_heap() -> None:
    """Hand the heap that preparing freed back to the OS (glibc keeps it otherwise: about 0.12 GiB
    after the demo's 1024-token stage), so that a rank which prepared trains with the resident
    memory of one that did not, which is what the memory plan counts. A no-op without glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def _os_error(e: BaseException) -> OSError | None:
    """The OSError under `e`, which datasets wraps in its own errors."""
    while e is not None:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def prepare_shared(spec, source: str, split: str, tokenizer, seq_len: int, kind: str = "train", waiting=None):
    """prepare_split on rank 0 of the default group while the others wait (cache_dir must be
    shared by the nodes), then every rank memory-maps the result. Without a group: this process.
    The others wait on a key in the launcher's store, not in a collective: preparing a large
    corpus may take longer than the process groups' timeout. Every WAIT_CHECK they call
    `waiting()`, which raises when rank 0 has stopped (a heartbeat gone silent); rank 0's own
    failure reaches them as a key too, and each rank raises it."""
    import torch.distributed as dist

    grouped = dist.is_available() and dist.is_initialized()
    if not grouped:
        return load_prepared(prepare_split(spec, source, split, tokenizer, seq_len, kind))
    from ringpatch.parallel.process import launch_store

    store = launch_store()
    folder = prepared_folder(spec, source, split, tokenizer, seq_len, kind)
    key = f"ringpatch/prepared/{folder.name}"
    if dist.get_rank() == 0:
        try:
            prepare_split(spec, source, split, tokenizer, seq_len, kind)
        except Exception as e:
            store.set(key, f"failed: {e}")
            raise
        store.set(key, "done")
    else:
        _wait_for(store, key, waiting)
    return load_prepared(folder)


WAIT_CHECK = 15.0  # seconds between two looks at the preparing rank's heartbeat


def _wait_for(store, key: str, waiting) -> None:
    from datetime import timedelta

    deadline = time.monotonic() + 24 * 3600
    while True:
        try:
            store.wait([key], timedelta(seconds=WAIT_CHECK))
            break
        except Exception as e:  # the store's timeout: check that the preparing rank still lives
            if "timeout" not in str(e).lower() and "timed out" not in str(e).lower():
                raise
            if waiting is not None:
                waiting()
            if time.monotonic() > deadline:
                raise DataError(f"rank 0 did not finish preparing the data within 24 hours ({key})") from None
    state = store.get(key).decode()
    if state.startswith("failed"):
        raise DataError(f"rank 0 could not prepare the data ({state.split(': ', 1)[1]})")


def load_prepared(folder: str | Path):
    """The packed sequences, memory-mapped, as torch tensors."""
    import datasets

    if not Path(folder, MARKER).is_file():
        raise BadValue(f"{folder} is not a complete prepared dataset (no {MARKER}); run ringpatch prepare again")
    return datasets.load_from_disk(str(Path(folder, "data"))).with_format("torch")


def prepare_recipe(recipe) -> list[Path]:
    """Prepare every stage's training data and the held-out data at every length the run and
    its evaluation read; the trainer and `ringpatch eval` then find them by fingerprint."""
    if recipe.data is None:
        raise BadValue("the recipe has no data section (data.source) to prepare")
    spec = recipe.data
    tokenizer = load_tokenizer(recipe.model.tokenizer, recipe.model.name)
    folders = []
    for i, stage in enumerate(recipe.stages):  # each stage's own mixture weights (the same data: found, not redone)
        stage_spec = recipe.stage_data(i)
        folder = prepare_split(stage_spec, stage_spec.source, stage_spec.split, tokenizer, stage.seq_len, "train")
        folders += [folder] if folder not in folders else []
    if spec.eval_source is not None:
        lengths = {s.seq_len for s in recipe.stages} | (
            {max(recipe.eval.ppl_lengths)} if recipe.eval.ppl_lengths else set()
        )
        folders += [
            prepare_split(spec, spec.eval_source, spec.eval_split, tokenizer, n, "eval") for n in sorted(lengths)
        ]
    return folders
