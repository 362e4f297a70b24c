"""The public planner API: ringpatch.plan.for_recipe gives the typed plan that `ringpatch plan`
prints (its budgets by Item, the longest context, the simulated rank), and refuses what the trainer
refuses, as a UserError."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import HANG_S, ROOT

pytestmark = pytest.mark.unit

RECIPE = str(ROOT / "recipes" / "llama3-8b-1m-1node.yaml")


def test_the_plan_of_a_recipe_is_what_the_command_prints():
    from ringpatch.plan import for_recipe
    from ringpatch.plan.items import Item

    plan = for_recipe(RECIPE, nodes=1, gpus_per_node=8)
    last = plan.budget()  # the longest stage, 1M
    assert plan.dims.world == 8 and plan.cuda and plan.bf16
    assert last == plan.budget(len(plan.recipe.stages) - 1) and Item.MLP_BACKWARD in last.items
    context = plan.max_context(79, host_gib_per_gpu=1536 / 8)
    printed = subprocess.run(
        [sys.executable, "-m", "ringpatch.cli", "plan", "--recipe", RECIPE, "--nodes", "1", "--gpu-memory", "79",
         "--max-context"], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S,
    ).stdout  # fmt: skip
    assert f"{last.tensors:.1f} + {sum(last.reserve.values()):.1f} = {last.total:.1f}" in printed
    assert f"micro_batch 1: {context.seq_len:,} tokens" in printed and context.seq_len >= 5_000_000


def test_a_bad_request_is_a_user_error(tmp_path):
    from ringpatch.errors import UserError
    from ringpatch.plan import for_recipe

    with pytest.raises(UserError, match="does not exist"):
        for_recipe(str(tmp_path / "missing.yaml"))
    with pytest.raises(UserError, match="device must be cuda or cpu"):
        for_recipe(RECIPE, device="tpu")
    with pytest.raises(UserError, match="no context"):
        for_recipe(RECIPE).max_context(1)
