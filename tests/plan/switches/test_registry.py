"""The switch registry: each switch's key is a recipe field with its default and description, its
refusals and plan words reach the recipe and `ringpatch plan`, and its resume rule the checkpoint."""

from __future__ import annotations

import dataclasses

import pytest

from ringpatch.plan.switches import SWITCHES

pytestmark = pytest.mark.unit


def test_every_switch_is_a_recipe_key_with_its_default_and_description():
    from ringpatch.plan.recipe import Recipe
    from ringpatch.schema import schema_rows

    rows = {row[0]: row for row in schema_rows(Recipe)}
    for switch in SWITCHES:
        # a top-level key is the recipe's field; a sectioned one (zero.offload) its section's
        holder = (
            {f.name: f for f in dataclasses.fields(Recipe)}[switch.section].default_factory
            if switch.section
            else Recipe
        )
        fields = {f.name: f for f in dataclasses.fields(holder)}
        assert fields[switch.key].default == switch.default, switch.name
        assert rows[switch.name][4] == switch.doc and len(switch.doc) > 40, switch.name
    assert len({s.name for s in SWITCHES}) == len(SWITCHES)


def test_the_checkpoint_fixes_exactly_the_switches_that_say_so():
    from ringpatch.train.checkpoint import FIXED

    for switch in SWITCHES:
        assert (switch.name in FIXED) == switch.fixed_on_resume, switch.name


@pytest.mark.parametrize("switch", [s for s in SWITCHES if s.needs_checkpointing], ids=lambda s: s.key)
def test_a_switch_on_checkpointed_layers_is_refused_without_checkpointing(tmp_path, switch):
    from tests.helpers.trainrun import corpus, recipe

    on = {"activation_offload": True, "keep_attention": True, "uncheckpointed_layers": 1}[switch.key]
    path = recipe(tmp_path, corpus(tmp_path / "c"), activation_checkpointing=False, **{switch.key: on})
    from ringpatch.plan.recipe import load_recipe

    with pytest.raises(ValueError, match=rf"^{switch.key}: .*, but activation_checkpointing is false, so .*: set "
                                         rf"activation_checkpointing: true, or {switch.key}: "):  # fmt: skip
        load_recipe(str(path))


def test_each_switch_that_is_on_has_its_words_in_the_plan(tmp_path):
    """The plan's first line names every switch turned on (the tiny recipe's values, one at a time)."""
    from ringpatch.plan.budget import describe
    from ringpatch.plan.preflight import preflight
    from tests.helpers.trainrun import corpus, recipe

    data = corpus(tmp_path / "c")
    values = {"activation_offload": True, "keep_attention": True, "mlp_tiles": 2, "rmsnorm": "chunked",
              "uncheckpointed_layers": 1, "activation_checkpointing": False, "loss_chunk_tokens": 512,
              "zero.offload": "optimizer"}  # fmt: skip
    base = describe(preflight(str(recipe(tmp_path, data)), world=1)).splitlines()[0]
    for switch in SWITCHES:
        value = values[switch.name]
        key = {switch.section: {"stage": 2, switch.key: value}} if switch.section else {switch.key: value}
        plan = preflight(str(recipe(tmp_path, data, **key)), world=1)
        first = describe(plan).splitlines()[0]
        assert first != base and switch.plan_words(plan.recipe).strip(", ") in first, (switch.name, first)


def test_the_docs_switch_table_is_the_registrys():
    """docs/memory.md's table of the switches is what the registry writes (each switch's `does` and
    `costs`), so a switch added, moved or reworded shows in the docs without an edit there."""
    from ringpatch.plan.switches.__main__ import DOC, with_table

    for switch in SWITCHES:
        assert switch.does and switch.costs, switch.name
    text = DOC.read_text()
    assert with_table(text) == text, "docs/memory.md's switches' table is stale: run python -m ringpatch.plan.switches"
    assert all(f"| `{s.name}" in text for s in SWITCHES)


def test_the_loss_chunk_is_a_switch_with_its_item_and_remedy(tmp_path):
    """loss_chunk_tokens: its item of the plan comes from its module (a smaller chunk, a smaller item),
    and the memory check names it as the remedy for that item."""
    from ringpatch.plan.budget import estimate
    from ringpatch.plan.items import Item
    from ringpatch.plan.preflight import preflight
    from ringpatch.plan.switches import LOSS_CHUNK, remedy
    from tests.helpers.trainrun import corpus, recipe

    data = corpus(tmp_path / "c")
    items = {}
    for chunk in (1024, 256):
        path = recipe(tmp_path, data, loss_chunk_tokens=chunk, stages=[{"seq_len": 4096, "steps": 1}])
        plan = preflight(str(path), world=1)
        items[chunk] = estimate(plan.recipe, plan.model_config, 1, 4096, 1)[Item.LOSS_CHUNK]
        assert remedy(plan.recipe, Item.LOSS_CHUNK) == f"loss_chunk_tokens: {max(256, chunk // 4)}"
    assert LOSS_CHUNK in SWITCHES and items[256] < items[1024]


def test_the_schema_states_a_number_keys_rule_in_its_own_type():
    """A float key's range reads as a number, an int key's as an integer (optim.betas, a pair of
    floats in [0, 1], once read "an integer in [0, 1]")."""
    from ringpatch.plan.recipe import Recipe
    from ringpatch.schema import schema_rows

    rows = {row[0]: row for row in schema_rows(Recipe)}
    assert rows["optim.betas"][3] == "a finite number in [0.0, 1.0]"
    assert rows["optim.lr"][3] == "a finite number in (0.0, inf)"
    assert rows["stages[].seq_len"][3] == "> 0"
