"""Recipes: one YAML file validated into frozen dataclasses.

Unknown keys are an error that lists the valid ones; every value is checked with a message
that carries the numbers. Values that DeepSpeed needs (learning rate, batch sizes,
precision, ZeRO) are generated from the recipe (ds_config.deepspeed_config), never typed twice.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from ringpatch.attention.layout import PACKED_LAYOUT, Layout
from ringpatch.attention.ulysses import check_ulysses
from ringpatch.data.tasks import EVAL_SEED, MAX_DIGITS, SYNTHETIC, RulerTask
from ringpatch.errors import BadType, BadValue, Missing, Unsupported
from ringpatch.evaluate.spec import EvalSpec
from ringpatch.hf.architecture import check_declared
from ringpatch.hf.rope import check_rope_scaling
from ringpatch.parallel import ParallelDims
from ringpatch.plan.switches import check_recipe as check_switches
from ringpatch.plan.switches import with_switch_fields
from ringpatch.schema import NONNEGATIVE, POSITIVE, PathKind, Range, check_fields


@dataclass(frozen=True)
class ModelSpec:
    name: Annotated[str, PathKind("source")]
    """A hub id (e.g. meta-llama/Meta-Llama-3-8B) or a local folder with config.json; with
    init: scratch, only the run's label."""
    init: Literal["pretrained", "scratch"] = "pretrained"
    """pretrained: load the weights of `name`; scratch: build `config` with random weights (seeded)."""
    config: dict | None = None
    """A transformers config (with model_type). scratch: the architecture. pretrained: optional, the
    architecture expected, so the plan's memory estimate needs no download (checked against the loaded one)."""
    tokenizer: Annotated[str, PathKind("source")] | None = None
    """A hub id or folder; None: the model's own; "bytes": ringpatch's byte-level tokenizer (no download)."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Training precision: auto = bfloat16 on GPU, float32 on CPU."""

    def __post_init__(self):
        _check_model(self)


@dataclass(frozen=True)
class SourceSpec:
    source: Annotated[str, PathKind("source")]
    """A hub dataset name, or a local json/jsonl/parquet/txt file or folder of them."""
    weight: Annotated[float, POSITIVE]
    """This source's share of the training tokens, relative to the others' weights (0.6 and 0.4, or 3 and 2)."""
    text_field: str | None = None
    """The column that holds each document's text (None: data.text_field)."""
    split: str | None = None
    """The split to read (None: data.split)."""
    min_doc_tokens: Annotated[int, NONNEGATIVE] | None = None
    """Skip this source's documents shorter than this (None: data.min_doc_tokens)."""
    tasks: tuple[RulerTask, ...] = ()
    """source: synthetic:ruler only: the RULER-style tasks to generate (empty: all six); each stage
    draws from those whose template fits its seq_len (ringpatch/data/tasks.py)."""
    seed: Annotated[int, Range(0, 2**32 - 1)] | None = None
    """source: synthetic:ruler only: the generator's seed (None: 1); never the evaluation's (0)."""
    value_digits: Annotated[int, Range(1, MAX_DIGITS)] | None = None
    """source: synthetic:ruler only: digits of each value (None: 7, as RULER and eval.ruler_value_digits)."""
    intro: bool | None = None
    """source: synthetic:ruler only: open each prompt with its task's instruction line (None: true);
    false makes prompts short enough for short stages (niah_single fits 128 bytes)."""

    def __post_init__(self):
        check_fields(self, "data.sources[]")
        _check_names(self, "data.sources[]", ("text_field", "split"))
        _check_synthetic(self)


@dataclass(frozen=True)
class DataSpec:
    source: Annotated[str, PathKind("source")] | None = None
    """A hub dataset name, or a local json/jsonl/parquet/txt file or folder of them (or give data.sources)."""
    sources: tuple[SourceSpec, ...] = ()
    """A training mixture instead of one source: each source with its weight; packed sequences draw
    documents so that each source's share of the tokens follows its weight."""
    text_field: str = "text"
    """The column that holds each document's text."""
    split: str = "train"
    """The split to read: a hub dataset's name for it; a local file or folder has only "train"."""
    eval_source: Annotated[str, PathKind("source")] | None = None
    """Held-out documents (same kinds of source) for the stage-end loss and perplexity-vs-length."""
    eval_split: str = "train"
    """The eval source's split (as `split`)."""
    eval_text_field: str | None = None
    """The column that holds each held-out document's text (None: text_field)."""
    eval_samples: Annotated[int, POSITIVE] = 4
    """Held-out packed sequences scored at each stage end."""
    streaming: bool = False
    """Read the source as a stream (corpora larger than memory or disk), tokenised by num_proc
    workers in order."""
    num_proc: Annotated[int, POSITIVE] = 1
    """Tokenising processes; the prepared sequences and their fingerprint do not depend on it."""
    min_doc_tokens: Annotated[int, NONNEGATIVE] = 0
    """Skip documents shorter than this (long-context runs want long documents)."""
    max_sequences: Annotated[int, POSITIVE] | None = None
    """Stop packing a stage after this many sequences (None: the whole source)."""
    document_masking: bool = True
    """true: attention stays inside each packed document and positions restart at 0 for each
    (exact: the loss of every document run alone; pair it with parallel.layout: balanced, which
    evens out the ranks' work). false: one sequence across the documents, positions running on
    (continual pretraining on concatenated text)."""
    cache_dir: Annotated[str, PathKind("dir")] = "runs/data"
    """Prepared (tokenised, packed) stages, one folder per fingerprint; shared by every node."""

    def __post_init__(self):
        _check_data(self)


@dataclass(frozen=True)
class ParallelSpec:
    sp: Annotated[int, POSITIVE] = 1
    """Sequence-parallel ranks per sample."""
    tp: Annotated[int, POSITIVE] = 1
    """Tensor-parallel ranks (DeepSpeed AutoTP); dp is what remains of the world."""
    layout: Layout = PACKED_LAYOUT
    """Token layout over the ring. balanced: zigzag for one sequence, and with packed documents
    (data.document_masking) a placement by each batch's documents that keeps the ranks' work
    within a few percent; lengths must divide by 8*sp (zigzag: 2*sp, contiguous: sp)."""
    ulysses: Annotated[int, POSITIVE] = 1
    """Ulysses x ring: of the sp ranks, groups of this many neighbours (one node, with their tp
    ranks) trade sequence for heads by all-to-all, and the ring runs over sp / ulysses ranks.
    Must divide sp and the query heads per tp rank; K/V heads per tp rank are split when they
    divide by it, repeated when it is a multiple of them. 1: the ring alone."""

    def __post_init__(self):
        check_fields(self, "parallel")
        try:
            check_ulysses(self.ulysses, self.sp)  # the grid's own check, with the recipe's key
        except ValueError as e:
            raise BadValue(f"parallel.ulysses / parallel.sp: {e}") from None

    def dims(self, world: int | None = None) -> ParallelDims:
        """The grid over `world` ranks (None: the smallest world, one data-parallel rank)."""
        world = self.sp * self.tp if world is None else world
        return ParallelDims(world, self.sp, self.tp, self.layout, self.ulysses)


@dataclass(frozen=True)
@with_switch_fields(after="stage", section="zero")  # offload (plan/switches/zero_offload.py)
class ZeroSpec:
    stage: Annotated[int, Range(0, 3)] = 2
    """DeepSpeed ZeRO stage, 0-3."""

    def __post_init__(self):
        check_fields(self, "zero")


@dataclass(frozen=True)
class OptimSpec:
    lr: Annotated[float, POSITIVE] = 2e-5
    """Peak learning rate (a stage may set its own)."""
    weight_decay: Annotated[float, NONNEGATIVE] = 0.0
    """Decoupled weight decay (AdamW)."""
    betas: Annotated[tuple[float, float], Range(0.0, 1.0)] = (0.9, 0.95)
    """Adam's (beta1, beta2), each below 1."""
    warmup_steps: Annotated[int, NONNEGATIVE] = 0
    """Linear warm-up at the start of each stage, then cosine decay to min_lr_ratio * lr."""
    min_lr_ratio: Annotated[float, Range(0.0, 1.0)] = 0.1
    """The cosine schedule ends at this fraction of the peak learning rate."""
    grad_clip: Annotated[float, NONNEGATIVE] = 1.0
    """Clip the global gradient norm to this value (0 = off)."""

    def __post_init__(self):
        _check_optim(self)


@dataclass(frozen=True)
class Stage:
    seq_len: Annotated[int, POSITIVE]
    """Tokens per sample in this stage."""
    steps: Annotated[int, POSITIVE]
    """Optimizer steps in this stage."""
    rope_theta: Annotated[float, POSITIVE] | None = None
    """RoPE base for this stage (None keeps the model's)."""
    rope_scaling: dict | None = None
    """transformers rope_scaling dict (e.g. {rope_type: yarn, factor: 4.0}); excludes rope_theta changes."""
    lr: Annotated[float, POSITIVE] | None = None
    """Peak learning rate of this stage (None: optim.lr)."""
    micro_batch: Annotated[int, POSITIVE] | None = None
    """Samples per dp rank per micro-step in this stage (None: the recipe's micro_batch); longer
    stages usually take fewer samples so the tokens per step stay level."""
    source_weights: tuple[float, ...] | None = None
    """This stage's weight for each of data.sources, in their order (None: their own weights); 0
    leaves a source out of the stage (a synthetic task too long for it, say)."""


@dataclass(frozen=True)
@with_switch_fields(after="grad_accum")  # activation_checkpointing, activation_offload, ... (plan/switches)
class Recipe:
    model: ModelSpec
    """The model: its name, weights, architecture, tokenizer and training precision."""
    stages: tuple[Stage, ...]
    """Context-extension stages, in order, lengths not decreasing."""
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    """How each sample is split over ranks (sp, Ulysses, tp, layout); dp is what the world leaves."""
    zero: ZeroSpec = field(default_factory=ZeroSpec)
    """DeepSpeed ZeRO stage and offload."""
    optim: OptimSpec = field(default_factory=OptimSpec)
    """AdamW and its schedule."""
    micro_batch: Annotated[int, POSITIVE] = 1
    """Samples per dp rank per micro-step."""
    grad_accum: Annotated[int, POSITIVE] = 1
    """Micro-steps per optimizer step."""
    seed: Annotated[int, Range(0, 2**32 - 1)] = 0
    """Seeds the scratch weights, the samplers' order and the evaluation prompts."""
    run_dir: Annotated[str, PathKind("dir")] = "runs/default"
    """Checkpoints, metrics, exports and the run's lock (created if missing)."""
    save_every: Annotated[int, NONNEGATIVE] = 0
    """Checkpoint every N optimizer steps (0: only at stage ends)."""
    wandb: Literal["online", "offline", "disabled"] = "disabled"
    """Weights & Biases logging beside metrics.jsonl."""
    wandb_project: str = "ringpatch"
    """The wandb project."""
    data: DataSpec | None = None
    """Training data; required to train."""
    eval: EvalSpec = field(default_factory=EvalSpec)
    """Evaluation: perplexity by length, passkey, RULER tasks (`ringpatch eval`)."""
    engine: Literal["deepspeed", "fsdp2"] = "deepspeed"
    """What shards and steps the model: DeepSpeed ZeRO (zero.stage, the deepspeed file), or FSDP2
    (torch's fully_shard, layer by layer over every rank, as ZeRO-3; zero.offload: cpu for host
    memory; tp 1)."""
    deepspeed: Annotated[str, PathKind("file")] | None = None
    """A DeepSpeed JSON (launch/deepspeed/) with tuning knobs; values the recipe owns must be "auto" there."""
    export_stages: bool = True
    """Export a Hugging Face folder at the end of every stage (run_dir/stageN), not only final/."""
    log_every: Annotated[int, POSITIVE] = 1
    """Write metrics every N optimizer steps."""
    keep_last: Annotated[int, NONNEGATIVE] = 2
    """Checkpoints kept in run_dir/checkpoints (older ones are deleted after a newer one is complete);
    0 keeps every one."""
    timeout_minutes: Annotated[float, Range(0.1, 10080.0)] | None = None
    """How long a rank waits for the others in a collective before the run stops with a message
    naming the rank that stopped making progress (None: 5 on CPU, 30 on GPU; at most a week)."""
    peak_tflops: Annotated[float, Range(0, low_open=True)] | None = None
    """The device's peak dense TFLOP/s per GPU that the logged MFU divides by (None: the data-sheet
    bf16 figure of a known GPU, tf32's for float32; on CPU a matmul measured at start)."""

    def __post_init__(self):
        _check_recipe(self)

    def stage_data(self, index: int) -> DataSpec:
        """The data spec stage `index` trains on: data, with the stage's source_weights applied
        (sources weighted 0 left out)."""
        weights = self.stages[index].source_weights
        if weights is None:
            return self.data
        kept = tuple(dataclasses.replace(m, weight=w) for m, w in zip(self.data.sources, weights, strict=True) if w > 0)
        return dataclasses.replace(self.data, sources=kept)


def _check_fsdp2(r: Recipe) -> None:
    """What engine: fsdp2 runs: everything sharded over every rank (zero.stage 3's meaning), no
    tensor parallelism, no DeepSpeed file."""
    if r.zero.stage != 3:
        raise BadValue(
            f"engine: fsdp2 shards parameters, gradients and optimizer states over every rank, as ZeRO-3 does, but "
            f"zero.stage is {r.zero.stage}: set zero.stage: 3 (zero.offload: cpu keeps them in host memory), or use "
            "engine: deepspeed for ZeRO-1/2"
        )
    if r.parallel.tp > 1:
        raise Unsupported(
            f"engine: fsdp2 with parallel.tp {r.parallel.tp}: ringpatch's tensor parallelism is DeepSpeed's AutoTP; "
            "use engine: deepspeed (zero.stage <= 2) for tp > 1, or tp: 1"
        )
    if r.deepspeed is not None:
        raise BadValue(f"deepspeed: {r.deepspeed} is a DeepSpeed config, which engine: fsdp2 does not read; remove it")


def _check_recipe(r: Recipe) -> None:
    for key in ("source", "eval_source"):  # here, not in DataSpec: a mixture's members are DataSpecs too
        if r.data is not None and getattr(r.data, key) == SYNTHETIC:
            raise BadValue(
                f"data.{key} {SYNTHETIC}: the synthetic tasks are a training source for a mixture; give it as one of "
                f"data.sources with its weight, beside the documents it is mixed with"
            )
    check_fields(r, "")
    if not r.stages:
        raise BadValue("a recipe needs at least one stage (seq_len, steps)")
    check_switches(r)
    if r.engine == "fsdp2":
        _check_fsdp2(r)
    if r.parallel.tp > 1 and r.zero.stage == 3:
        raise BadValue("DeepSpeed AutoTP training does not combine with ZeRO-3; use zero.stage <= 2 with tp > 1")
    dims = r.parallel.dims()
    previous = 0
    for i, stage in enumerate(r.stages):
        _check_stage(stage, f"stages[{i}]")
        if stage.seq_len % dims.seq_len_divisor:
            raise BadValue(
                f"stages[{i}].seq_len {stage.seq_len} is not divisible by the {r.parallel.layout} layout's "
                f"{dims.seq_len_divisor} chunks (sp={r.parallel.sp}); use {dims.round_up(stage.seq_len)}"
            )
        _check_stage_weights(r, i)
        if stage.seq_len < previous:
            raise BadValue(f"stages[{i}].seq_len {stage.seq_len} is shorter than the stage before ({previous})")
        previous = stage.seq_len


def _check_stage(s: Stage, where: str) -> None:
    check_fields(s, where)
    if s.rope_theta is not None and s.rope_scaling is not None:
        raise BadValue(f"{where} sets both rope_theta and rope_scaling; choose one rule")
    if s.rope_scaling is not None:
        check_rope_scaling(s.rope_scaling, f"{where}.rope_scaling", stage=True)


def _check_optim(o: OptimSpec) -> None:
    check_fields(o, "optim")
    for i, beta in enumerate(o.betas):
        if beta == 1.0:
            raise BadValue(f"optim.betas[{i}] must be below 1 (Adam divides by 1 - beta), got {beta}")


def _check_model(m: ModelSpec) -> None:
    check_fields(m, "model")
    if m.init == "scratch" and not (m.config and "model_type" in m.config):
        raise BadValue("model.init: scratch needs model.config with a model_type (e.g. {model_type: llama, ...})")
    if m.init == "scratch" and m.tokenizer is None:
        raise BadValue('model.init: scratch has no tokenizer of its own: set model.tokenizer (e.g. "bytes")')
    if m.config is not None and "model_type" not in m.config:
        raise BadValue(f"model.config needs a model_type key; it has {sorted(m.config)}")
    if m.config is not None:
        check_declared(m.config, "model.config")


def _check_names(spec, prefix: str, names) -> None:
    """Column and split names: None (the default) or non-empty."""
    for name in names:
        value = getattr(spec, name)
        if value is not None and not value.strip():
            raise BadValue(f"{prefix}.{name} must be a non-empty name, got {value!r}")


def _check_data(d: DataSpec) -> None:
    check_fields(d, "data")
    if (d.source is None) == (not d.sources):
        raise BadValue(
            "data needs exactly one of source (one source) and sources (a mixture, each with its weight), got "
            + ("both" if d.source is not None else "neither (an empty sources list counts as none)")
        )
    _check_names(d, "data", ("text_field", "split", "eval_split", "eval_text_field"))
    if d.sources and all(m.source == SYNTHETIC for m in d.sources) and d.max_sequences is None:
        raise BadValue(
            f"data.sources are all {SYNTHETIC}, which never runs out: set data.max_sequences (the sequences to "
            "prepare per stage), or mix in a source of documents"
        )


def _check_stage_weights(r: Recipe, i: int) -> None:
    weights = r.stages[i].source_weights
    if weights is None:
        return
    where = f"stages[{i}].source_weights"
    sources = r.data.sources if r.data is not None else ()
    if len(weights) != len(sources):
        raise BadValue(
            f"{where} has {len(weights)} weights for the {len(sources)} data.sources; give one per source, in their "
            "order (0 leaves one out of the stage)" + ("" if sources else ": without data.sources, remove it")
        )
    bad = [w for w in weights if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0)]
    if bad or not any(w > 0 for w in weights):
        raise BadValue(
            f"{where} {list(weights)}: each must be a finite number >= 0, and at least one > 0 (0 leaves a source "
            "out of the stage)"
        )
    kept = [m.source for m, w in zip(sources, weights, strict=True) if w > 0]
    if all(source == SYNTHETIC for source in kept) and r.data.max_sequences is None:
        raise BadValue(
            f"{where} {list(weights)} keeps only {SYNTHETIC}, which never runs out: set data.max_sequences, or give "
            "the stage a source of documents too"
        )


def _check_synthetic(m: SourceSpec) -> None:
    if m.source != SYNTHETIC:
        given = [k for k in ("tasks", "seed", "value_digits", "intro") if getattr(m, k) not in ((), None)]
        if given:
            raise BadValue(f"data.sources[] {m.source}: {given} apply to source: {SYNTHETIC} only; remove them")
        return
    given = [k for k in ("text_field", "split") if getattr(m, k) is not None]
    if given:
        raise BadValue(f"data.sources[] {SYNTHETIC} generates its documents and reads no {given}; remove them")
    if len(set(m.tasks)) != len(m.tasks):
        raise BadValue(f"data.sources[] {SYNTHETIC}: tasks names a task twice: {list(m.tasks)}")
    if m.seed == EVAL_SEED:
        raise BadValue(
            f"data.sources[] {SYNTHETIC}: seed {m.seed} is the seed of the evaluation's RULER prompts; training on "
            "the evaluation's seed is refused (its words are disjoint anyway, but no seed may be shared): give "
            "another seed, e.g. 1"
        )


def _convert(tp, value, where: str, folder: Path | None = None):
    """Check `value` against the annotation `tp`, building nested dataclasses (ranges and paths are
    the dataclasses' own checks, schema.check_fields); a path is read against `folder`, the recipe's
    (PathKind.resolve)."""
    if typing.get_origin(tp) is Annotated:
        for marker in tp.__metadata__:
            if isinstance(marker, PathKind):
                value = marker.resolve(where, value, folder)
        return _convert(tp.__origin__, value, where, folder)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, folder)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where, folder)
    if origin is Literal:
        if value not in args:
            raise BadValue(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise BadType(f"{where} must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise BadType(f"{where} must be a list, got {type(value).__name__} {value!r}")
        item_types = args if args[-1] is not Ellipsis else (args[0],) * len(value)
        if len(item_types) != len(value):
            raise BadValue(f"{where} must have {len(item_types)} items, got {len(value)}")
        return tuple(
            _convert(t, v, f"{where}[{i}]", folder) for i, (t, v) in enumerate(zip(item_types, value, strict=True))
        )
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (float, int) and isinstance(value, str) and _number(value) is not None:
        text = value.strip().lower()
        if "e" in text and "." not in text:  # YAML 1.1 reads 3e-3 as a string, 3.0e-3 as a number
            mantissa, exponent = text.split("e", 1)
            raise BadType(
                f"{where} must be a number, got the string {value!r}: YAML reads an exponent without a decimal "
                f"point as text; write {mantissa}.0e{exponent}"
            )
        raise BadType(f"{where} must be a number, got the string {value!r}; write it without quotes")
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise BadType(f"{where} must be {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r}")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def from_dict(cls, data, where: str = "recipe", folder: Path | None = None):
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types; relative paths
    are read against `folder` (None: the current folder)."""
    if not isinstance(data, dict):
        raise BadType(f"{where} must be a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise BadValue(f"{where}: unknown keys {unknown}; valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls, include_extras=True)
    required = [
        n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [n for n in required if n not in data]
    if missing:
        raise BadValue(f"{where}: missing required keys {missing}")
    return cls(**{k: _convert(hints[k], v, f"{where}.{k}", folder) for k, v in data.items()})


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last). Merge
    keys (`<<: *defaults`) are YAML's own: the keys they bring may be given again, which wins."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> object:
    """A YAML file's content; malformed YAML or a duplicate key is a ValueError naming the line."""
    try:
        return yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        context = getattr(e, "context", None)
        raise BadValue(
            f"{where} is not valid YAML: {problem}{f' ({context})' if context else ''}; fix the file"
        ) from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe YAML file. Its relative input paths (model, data, deepspeed) are
    read beside it, or in the current folder where only that has them (schema.PathKind.resolve);
    run_dir and cache_dir are relative to the current folder."""
    path = Path(path)
    if path.is_dir():
        raise BadValue(f"recipe {path} is a folder; give a recipe YAML file (e.g. recipes/tiny-cpu.yaml)")
    if not path.is_file():
        raise Missing(f"recipe {path} does not exist; recipes ship in recipes/ (e.g. recipes/tiny-cpu.yaml)")
    return from_dict(Recipe, read_yaml(path), where=path.name, folder=path.parent)


__all__ = [
    "Recipe",
    "Stage",
    "DataSpec",
    "SourceSpec",
    "EvalSpec",
    "ModelSpec",
    "ParallelSpec",
    "load_recipe",
    "from_dict",
]
