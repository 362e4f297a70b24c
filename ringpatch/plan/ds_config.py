"""The DeepSpeed config of a run: generated from the recipe, once, with an optional overlay of
tuning knobs (launch/deepspeed/*.json) in which every value the recipe owns must be "auto"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ringpatch.errors import BadValue, Missing
from ringpatch.plan.recipe import Recipe


def load_overlay(path: str | None) -> dict | None:
    """The overlay JSON at `path` (None: no overlay)."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise Missing(f"DeepSpeed file {path} does not exist; the shipped ones are in launch/deepspeed/")

    def refuse_duplicates(pairs):
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise BadValue(f"keys {twice} are given twice")
        return dict(pairs)

    try:
        overlay = json.loads(Path(path).read_text(), object_pairs_hook=refuse_duplicates)
    except ValueError as e:  # json.JSONDecodeError is one
        raise BadValue(f"DeepSpeed file {path} is not valid JSON: {e}; fix the file") from None
    if not isinstance(overlay, dict):
        raise BadValue(f"DeepSpeed file {path} must hold a JSON object, got {type(overlay).__name__}")
    return overlay


def deepspeed_config(
    recipe: Recipe, bf16: bool, cuda: bool = False, overlay: dict | None = None, overlay_name: str = "overlay"
) -> dict:
    """The DeepSpeed config the recipe implies, merged with an optional overlay of tuning knobs.

    ZeRO and gradient averaging span dp x sp, so DeepSpeed's data-parallel size is dp*sp; it
    derives train_batch_size itself (with AutoTP its config check counts the whole world, so
    a value written here would be refused). tp > 1 turns on AutoTP training ("tensor_parallel":
    {"autotp_size": tp}; DeepSpeed takes its data-parallel group as world / tp, i.e. dp x sp,
    and supports ZeRO 0-2 with it). The optimizer is AdamW with the recipe's settings: torch's
    (no compiled op), except DeepSpeed's CPU Adam for an offloaded optimizer on GPU. The
    schedule is built by the trainer (schedule.py)."""
    o = recipe.optim
    zero: dict[str, Any] = {"stage": recipe.zero.stage}
    if recipe.zero.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu"}
        if recipe.zero.offload == "cpu" and recipe.zero.stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": recipe.micro_batch,  # DeepSpeed only reports it; stages may differ
        "gradient_accumulation_steps": recipe.grad_accum,
        "gradient_clipping": recipe.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "weight_decay": o.weight_decay,
                "torch_adam": not (cuda and recipe.zero.offload != "none"),
            },
        },
    }
    if recipe.parallel.tp > 1:
        config["tensor_parallel"] = {"autotp_size": recipe.parallel.tp}
    if overlay is not None:
        stage3_knobs = [k for k in overlay.get("zero_optimization", {}) if k.startswith("stage3_")]
        if stage3_knobs and recipe.zero.stage != 3:
            raise BadValue(
                f"{overlay_name} tunes ZeRO-3 ({stage3_knobs}) but the recipe says zero.stage {recipe.zero.stage}; "
                "pick the launch/deepspeed file of that stage"
            )
        _merge_overlay(config, overlay, overlay_name, "")
    return config


def _has_auto(value) -> bool:
    return value == "auto" or (isinstance(value, dict) and any(_has_auto(v) for v in value.values()))


def _merge_overlay(config: dict, overlay: dict, name: str, where: str) -> None:
    """Add the overlay's knobs to `config` in place. "auto" takes the recipe's value; a concrete
    value for something the recipe owns is refused, so no value is typed twice."""
    for key, value in overlay.items():
        path = f"{where}{key}"
        if key not in config:
            if _has_auto(value):
                raise BadValue(
                    f'{path} is "auto" in {name} but the recipe sets no value for it '
                    f"(e.g. zero.offload: none while {name} tunes offload); remove it or change the recipe"
                )
            config[key] = value
        elif isinstance(value, dict) and isinstance(config[key], dict):
            _merge_overlay(config[key], value, name, f"{path}.")
        elif value != "auto":
            raise BadValue(
                f'{path} = {value!r} in {name}, but the recipe owns it (it gives {config[key]!r}); write "auto" there'
            )
