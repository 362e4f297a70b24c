"""Recipes: one YAML file validated into frozen dataclasses.

Unknown keys are an error that lists the valid ones; every value is checked with a message
that carries the numbers. Values that DeepSpeed needs (learning rate, batch sizes,
precision, ZeRO) are generated from the recipe (`deepspeed_config`), never typed twice.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ringpatch.layout import num_chunks


@dataclass(frozen=True)
class ModelSpec:
    name: str
    """A hub id (e.g. meta-llama/Meta-Llama-3-8B) or a local folder with config.json."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Training precision: auto = bfloat16 on GPU, float32 on CPU."""


@dataclass(frozen=True)
class ParallelSpec:
    sp: int = 1
    """Sequence-parallel ranks per sample (the ring)."""
    tp: int = 1
    """Tensor-parallel ranks (DeepSpeed AutoTP); dp is what remains of the world."""
    layout: Literal["zigzag", "contiguous"] = "zigzag"
    """Token layout over the ring."""


@dataclass(frozen=True)
class ZeroSpec:
    stage: int = 2
    """DeepSpeed ZeRO stage, 0-3."""
    offload: Literal["none", "cpu"] = "none"
    """Offload optimizer state (stages 1-3) and parameters (stage 3) to CPU memory."""


@dataclass(frozen=True)
class OptimSpec:
    lr: float = 2e-5
    """Peak learning rate (a stage may set its own)."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    """Linear warm-up at the start of each stage, then cosine decay to min_lr_ratio * lr."""
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""


@dataclass(frozen=True)
class Stage:
    seq_len: int
    """Tokens per sample in this stage."""
    steps: int
    """Optimizer steps in this stage."""
    rope_theta: float | None = None
    """RoPE base for this stage (None keeps the model's)."""
    rope_scaling: dict | None = None
    """transformers rope_scaling dict (e.g. {rope_type: yarn, factor: 4.0}); excludes rope_theta changes."""
    lr: float | None = None
    """Peak learning rate of this stage (None: optim.lr)."""


@dataclass(frozen=True)
class Recipe:
    model: ModelSpec
    stages: tuple[Stage, ...]
    """Context-extension stages, in order, lengths not decreasing."""
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    zero: ZeroSpec = field(default_factory=ZeroSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    micro_batch: int = 1
    """Samples per dp rank per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    activation_checkpointing: bool = True
    seed: int = 0
    run_dir: str = "runs/default"
    save_every: int = 0
    """Checkpoint every N optimizer steps (0: only at stage ends)."""
    wandb: Literal["online", "offline", "disabled"] = "disabled"

    def __post_init__(self):
        _check_recipe(self)


def _positive(name: str, value, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if value < low:
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_recipe(r: Recipe) -> None:
    if not r.stages:
        raise ValueError("a recipe needs at least one stage (seq_len, steps)")
    for name, value in (("micro_batch", r.micro_batch), ("grad_accum", r.grad_accum)):
        _positive(name, value)
    _positive("save_every", r.save_every, allow_zero=True)
    _positive("parallel.sp", r.parallel.sp)
    _positive("parallel.tp", r.parallel.tp)
    if not 0 <= r.zero.stage <= 3:
        raise ValueError(f"zero.stage must be 0, 1, 2 or 3, got {r.zero.stage}")
    if r.zero.offload == "cpu" and r.zero.stage == 0:
        raise ValueError("zero.offload: cpu needs zero.stage >= 1")
    if r.parallel.tp > 1 and r.zero.stage == 3:
        raise ValueError("DeepSpeed AutoTP training does not combine with ZeRO-3; use zero.stage <= 2 with tp > 1")
    chunks = num_chunks(r.parallel.layout, r.parallel.sp)
    previous = 0
    for i, stage in enumerate(r.stages):
        _positive(f"stages[{i}].seq_len", stage.seq_len)
        _positive(f"stages[{i}].steps", stage.steps)
        if stage.seq_len % chunks:
            raise ValueError(
                f"stages[{i}].seq_len {stage.seq_len} is not divisible by the {r.parallel.layout} layout's "
                f"{chunks} chunks (sp={r.parallel.sp}); use {-(-stage.seq_len // chunks) * chunks}"
            )
        if stage.seq_len < previous:
            raise ValueError(f"stages[{i}].seq_len {stage.seq_len} is shorter than the stage before ({previous})")
        if stage.rope_theta is not None and stage.rope_scaling is not None:
            raise ValueError(f"stages[{i}] sets both rope_theta and rope_scaling; choose one rule")
        previous = stage.seq_len


def _convert(tp, value, where: str):
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        item_types = args if args[-1] is not Ellipsis else (args[0],) * len(value)
        if len(item_types) != len(value):
            raise ValueError(f"{where} must have {len(item_types)} items, got {len(value)}")
        return tuple(_convert(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(item_types, value, strict=True)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise TypeError(f"{where} must be {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r}")


def from_dict(cls, data, where: str = "recipe"):
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise TypeError(f"{where} must be a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    required = [
        n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [n for n in required if n not in data]
    if missing:
        raise ValueError(f"{where}: missing required keys {missing}")
    return cls(**{k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe YAML file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist; recipes ship in recipes/ (e.g. recipes/tiny-cpu.yaml)")
    data = yaml.safe_load(path.read_text())
    return from_dict(Recipe, data, where=path.name)


def deepspeed_config(recipe: Recipe, bf16: bool) -> dict:
    """The DeepSpeed config the recipe implies. ZeRO and gradient averaging span dp x sp, so
    DeepSpeed's data-parallel size is dp*sp; it derives train_batch_size itself (with AutoTP its
    config check counts the whole world, so a value written here would be refused). tp > 1 turns on AutoTP training ("tensor_parallel": {"autotp_size": tp}; DeepSpeed takes
    its data-parallel group as world / tp, i.e. dp x sp, and supports ZeRO 0-2 with it)."""
    zero: dict[str, Any] = {"stage": recipe.zero.stage}
    if recipe.zero.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if recipe.zero.stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_micro_batch_size_per_gpu": recipe.micro_batch,
        "gradient_accumulation_steps": recipe.grad_accum,
        "gradient_clipping": recipe.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if recipe.parallel.tp > 1:
        config["tensor_parallel"] = {"autotp_size": recipe.parallel.tp}
    return config


__all__ = ["Recipe", "Stage", "load_recipe", "from_dict", "deepspeed_config"]
