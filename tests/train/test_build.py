"""The trainer's model as built for a run (train/build.py: load_lm, prepare_lm)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.helpers.models import build
from tests.helpers.trainrun import recipe

pytestmark = pytest.mark.unit


def test_a_pretrained_model_trains_its_first_stage_with_its_switches_in_force(tmp_path, data):
    """from_pretrained returns a model in eval mode, where transformers skips activation
    checkpointing: the trainer's model must be in training mode from its first step, so a
    checkpointed layer runs twice per step (forward, and its recompute in backward)."""
    from ringpatch.plan.preflight import preflight
    from ringpatch.train.build import load_lm, prepare_lm

    build("llama").save_pretrained(tmp_path / "base")
    path = recipe(tmp_path, data, model={"name": str(tmp_path / "base"), "init": "pretrained", "dtype": "float32",
                                         "tokenizer": "bytes"})  # fmt: skip
    plan = preflight(str(path), world=1)
    assert plan.recipe.activation_checkpointing
    lm = prepare_lm(plan, load_lm(plan), SimpleNamespace(seq_group=None))
    assert lm.training and all(m.training for m in lm.modules())
    calls = {"n": 0}
    for layer in lm.model.layers:
        layer.mlp.register_forward_pre_hook(
            lambda *a: calls.__setitem__("n", calls["n"] + 1)
        )  # a recompute stops early, before the module returns
    import ringpatch

    ids = torch.randint(0, 101, (1, 32))
    lm(**ringpatch.shard_batch({"input_ids": ids, "labels": ids})).loss.backward()
    assert calls["n"] == 2 * len(lm.model.layers), f"{calls['n']} MLP forwards for {len(lm.model.layers)} layers"
