"""The evaluation-task registry: each task's keys are the eval section's, with their defaults and
descriptions, and its flags are the command's."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from ringpatch.evaluate.spec import EVAL_TASKS, EvalSpec

pytestmark = pytest.mark.unit


def test_the_eval_section_is_the_tasks_keys_and_the_ring_budget():
    from ringpatch.schema import schema_rows

    fields = {f.name: f for f in dataclasses.fields(EvalSpec)}
    owned = [key for task in EVAL_TASKS for key in task.keys]
    assert sorted(fields) == sorted(["max_tokens_per_rank", *(k.name for k in owned)])
    docs = {row[0]: row[4] for row in schema_rows(EvalSpec)}
    for key in owned:
        assert fields[key.name].default == key.default and docs[key.name] == key.doc and key.doc, key.name


def test_each_task_reads_its_own_flags():
    """Every task's flags parse, and with none given a task asks for no change."""
    parser = argparse.ArgumentParser()
    for task in EVAL_TASKS:
        task.add_flags(parser)
    args = parser.parse_args([])
    assert all(task.changes(args) == {} for task in EVAL_TASKS)
    args = parser.parse_args(["--ppl-lengths", "256", "512", "--trials", "3", "--ruler-tasks", "all",
                              "--ruler-value-digits", "2"])  # fmt: skip
    changes = {}
    for task in EVAL_TASKS:
        changes |= task.changes(args)
    spec = dataclasses.replace(EvalSpec(), **changes)
    assert spec.ppl_lengths == (256, 512) and spec.passkey_trials == 3 and spec.ruler_value_digits == 2
    assert len(spec.ruler_tasks) == 6


def test_empty_lengths_follow_the_tasks_before():
    """In a recipe, passkey lengths default to the perplexity lengths, RULER's to the passkey
    lengths; from flags alone (no recipe) a task without its own lengths does not run."""
    from ringpatch.plan.recipe import load_recipe
    from tests.helpers import ROOT

    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml")
    spec = EvalSpec(ppl_lengths=(256, 512), ruler_tasks=("niah_single",))
    for task in EVAL_TASKS:
        spec = task.complete(spec, recipe, recipe.data)
    assert spec.passkey_lengths == (256, 512) and spec.ruler_lengths == (256, 512)
    assert spec.lengths() == [256, 512] * 3
    spec = EvalSpec(ppl_lengths=(256, 512))
    for task in EVAL_TASKS:
        spec = task.complete(spec, None, recipe.data)  # as --data gives it
    assert spec.passkey_lengths == () and spec.lengths() == [256, 512]
