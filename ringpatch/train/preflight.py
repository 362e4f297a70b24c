"""Everything checked before a process group or a download starts, and the run's plan.

A bad recipe, a world that does not fit its layout, a model or data path that does not exist,
heads that tp does not divide, a DeepSpeed overlay that retypes a recipe value: each fails
here, on every rank alike, with the values and the fix."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ringpatch.train.ds_config import deepspeed_config, load_overlay
from ringpatch.train.plan import Plan
from ringpatch.train.recipe import Recipe, load_recipe

# What a bad recipe, launch or input raises: reported as one line, without a traceback.
USER_ERRORS = (ValueError, TypeError, NotImplementedError, FileNotFoundError, FloatingPointError)


def is_local(name: str) -> bool:
    """A local path, as opposed to a hub id ("org/name" or "name")."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).exists()


def _model_config(recipe: Recipe) -> dict | None:
    spec = recipe.model
    if spec.init == "scratch":
        return dict(spec.config)
    if is_local(spec.name):
        path = Path(spec.name).expanduser() / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"model.name {spec.name} is a local path without config.json; give a folder saved with "
                "save_pretrained, or a hub id such as meta-llama/Meta-Llama-3-8B"
            )
        saved = json.loads(path.read_text())
        check_model_config(spec.config or {}, saved, str(path))
        return saved
    return dict(spec.config) if spec.config else None


def check_model_config(expected: dict, actual: dict, where: str) -> None:
    """The recipe's model.config (if any) must describe the model that loads."""
    rope = actual.get("rope_parameters") or {}
    found = {k: actual.get(k, rope.get(k)) for k in expected}
    differ = {k: (v, found[k]) for k, v in expected.items() if found[k] != v}
    if differ:
        raise ValueError(f"model.config disagrees with {where} (recipe, model): {differ}; fix the recipe")


def _check_sources(recipe: Recipe) -> None:
    for name in ("source", "eval_source"):
        source = getattr(recipe.data, name)
        if source is not None and is_local(source) and not Path(source).exists():
            raise FileNotFoundError(
                f"data.{name} {source} does not exist; give a local json/jsonl/parquet/txt file or folder, "
                "or a hub dataset name (prepared with `ringpatch prepare`)"
            )


def preflight(
    recipe_path: str, run_dir: str | None = None, deepspeed_file: str | None = None, world: int | None = None
) -> Plan:
    """Load and check the recipe against the launched world; no process group, no download."""
    recipe = load_recipe(recipe_path)
    if run_dir is not None:
        recipe = dataclasses.replace(recipe, run_dir=run_dir)
    if recipe.data is None:
        raise ValueError(f"{recipe_path} has no data section; training needs data.source (see recipes/tiny-cpu.yaml)")
    world = world if world is not None else int(os.environ.get("WORLD_SIZE", "1"))
    dims = recipe.parallel.dims(world)
    model_config = _model_config(recipe)
    if model_config is not None:
        heads = model_config.get("num_attention_heads")
        if heads is not None:
            dims.check_heads(heads, model_config.get("num_key_value_heads") or heads)
    _check_sources(recipe)
    cuda = torch.cuda.is_available()
    bf16 = recipe.model.dtype == "bfloat16" or (recipe.model.dtype == "auto" and cuda)
    overlay_file = deepspeed_file or recipe.deepspeed
    ds_config = deepspeed_config(recipe, bf16, cuda, load_overlay(overlay_file), overlay_name=str(overlay_file))
    return Plan(recipe, dims, cuda, bf16, ds_config, model_config)
