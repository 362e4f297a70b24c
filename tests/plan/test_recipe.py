"""Recipes: YAML into frozen dataclasses; unknown keys, wrong types and bad values are refused."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from ringpatch.plan.ds_config import deepspeed_config
from ringpatch.plan.recipe import Recipe, from_dict, load_recipe

pytestmark = pytest.mark.unit

BASE = {
    "model": {"name": "meta-llama/Meta-Llama-3-8B"},
    "parallel": {"sp": 4, "tp": 2},
    "zero": {"stage": 2, "offload": "cpu"},
    "optim": {"lr": 1e-5, "betas": [0.9, 0.95], "warmup_steps": 10},
    "stages": [{"seq_len": 65536, "steps": 100, "rope_theta": 8e6}, {"seq_len": 131072, "steps": 50, "lr": 5e-6}],
    "micro_batch": 1,
    "grad_accum": 4,
}


def _with(**changes):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        node, *path = dotted.split("__")
        target = data
        for key in [node, *path][:-1]:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[[node, *path][-1]] = value
    return data


def test_loads_yaml_into_frozen_dataclasses(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    recipe = load_recipe(path)
    assert recipe.parallel.sp == 4 and recipe.stages[1].seq_len == 131072
    assert recipe.optim.betas == (0.9, 0.95) and recipe.stages[0].rope_theta == 8e6
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.micro_batch = 2


@pytest.mark.parametrize(
    "changes, exc, match",
    [
        (dict(zero__stages=3), ValueError, r"zero: unknown keys \['stages'\]; valid keys are \['offload', 'stage'\]"),
        (
            dict(micro_batch="1"),
            TypeError,
            r"recipe.micro_batch must be a number, got the string '1'; write it without quotes",
        ),
        (
            dict(parallel__layout="ring"),
            ValueError,
            r"parallel.layout must be one of \['contiguous', 'zigzag', 'balanced'\], got 'ring'",
        ),
        (
            dict(stages__0__seq_len=65537, parallel__layout="zigzag"),
            ValueError,
            r"stages\[0\].seq_len 65537 is not divisible by the zigzag layout's 8 chunks \(sp=4\); use 65544",
        ),
        (
            dict(stages__0__seq_len=65544),  # the default layout, balanced: 8 chunks per rank
            ValueError,
            r"stages\[0\].seq_len 65544 is not divisible by the balanced layout's 32 chunks \(sp=4\); use 65568",
        ),
        (dict(zero__stage=3), ValueError, r"AutoTP training does not combine with ZeRO-3"),
        (dict(zero__stage=5), ValueError, r"zero.stage must be an integer in \[0, 3\], got 5"),
        (
            dict(stages__1__seq_len=32768),
            ValueError,
            r"stages\[1\].seq_len 32768 is shorter than the stage before \(65536\)",
        ),
        (
            dict(stages__0__rope_scaling={"rope_type": "yarn", "factor": 4.0}),
            ValueError,
            r"sets both rope_theta and rope_scaling",
        ),
        (dict(stages=[]), ValueError, r"needs at least one stage"),
        (dict(optim__betas=[0.9]), ValueError, r"optim.betas must have 2 items, got 1"),
        (dict(grad_accum=0), ValueError, r"grad_accum must be > 0, got 0"),
    ],
)
def test_bad_recipes(changes, exc, match):
    with pytest.raises(exc, match=match):
        from_dict(Recipe, _with(**changes))


def test_missing_keys_and_files(tmp_path):
    with pytest.raises(ValueError, match=r"missing required keys \['model'\]"):
        from_dict(Recipe, {"stages": BASE["stages"]})
    with pytest.raises(FileNotFoundError, match=r"recipe .*nope.yaml does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_deepspeed_config_comes_from_the_recipe():
    recipe = from_dict(Recipe, BASE)
    cfg = deepspeed_config(recipe, bf16=True)
    assert cfg["train_micro_batch_size_per_gpu"] == 1 and cfg["gradient_accumulation_steps"] == 4
    assert "train_batch_size" not in cfg  # DeepSpeed derives it; with AutoTP a written one is refused
    assert cfg["zero_optimization"] == {
        "stage": 2,
        "offload_optimizer": {"device": "cpu"},
    }  # pin_memory: a knob (launch/deepspeed)
    assert cfg["gradient_clipping"] == recipe.optim.grad_clip and cfg["bf16"] == {"enabled": True}
    assert cfg["tensor_parallel"] == {"autotp_size": 2}
    no_tp = from_dict(Recipe, _with(parallel__tp=1))
    assert "tensor_parallel" not in deepspeed_config(no_tp, bf16=False)
