"""Memory switches: each is one recipe key and one module that owns its default, its checks, how
it is applied to the model, its items in the memory plan, the remedy it offers, its words in
`ringpatch plan` and whether a checkpoint resumes under another value.

SWITCHES lists them in the order they are applied to a model. The recipe, preflight, planner,
trainer and checkpoint rules loop over it; adding a switch is one module here, its entry in
SWITCHES and its test (docs/memory.md, "Adding a switch").
"""

from __future__ import annotations

from ringpatch.plan.estimate import LayerFlags, StateFlags
from ringpatch.plan.items import Item
from ringpatch.plan.switches.base import Switch
from ringpatch.plan.switches.checkpointing import ACTIVATION_CHECKPOINTING
from ringpatch.plan.switches.keep_attention import KEEP_ATTENTION
from ringpatch.plan.switches.loss_chunk import LOSS_CHUNK
from ringpatch.plan.switches.mlp_tiles import MLP_TILES
from ringpatch.plan.switches.offload import ACTIVATION_OFFLOAD
from ringpatch.plan.switches.rmsnorm import RMSNORM
from ringpatch.plan.switches.uncheckpointed import UNCHECKPOINTED_LAYERS
from ringpatch.plan.switches.zero_offload import ZERO_OFFLOAD
from ringpatch.schema import with_keys

# Applied in this order: checkpointing (with offload's checkpoint function) before the switch that
# takes layers out of it; the MLP and norm replacements act inside whatever is checkpointed; the
# engine's offload (its configuration) after the model's.
SWITCHES: tuple[Switch, ...] = (
    ACTIVATION_CHECKPOINTING,
    ACTIVATION_OFFLOAD,
    UNCHECKPOINTED_LAYERS,
    KEEP_ATTENTION,
    MLP_TILES,
    RMSNORM,
    LOSS_CHUNK,
    ZERO_OFFLOAD,
)


def with_switch_fields(after: str, section: str = ""):
    """Class decorator (under @dataclass): the keys of the switches in `section` (empty: the
    recipe's top level) as fields of the class, after `after`."""
    return with_keys([s.recipe_key() for s in SWITCHES if s.section == section], after)


def check_recipe(recipe) -> None:
    for s in SWITCHES:
        s.check(recipe)


def check_model(recipe, model_config: dict) -> None:
    for s in SWITCHES:
        s.check_model(recipe, model_config)


def apply(recipe, lm) -> dict:
    """Every switch applied to a loaded LM, in order; the patch_model keyword arguments they ask for."""
    kwargs = {}
    for s in SWITCHES:
        kwargs |= s.apply(recipe, lm)
    return kwargs


def layer_flags(recipe, kernel: str) -> LayerFlags:
    """What the switches (and the layout) change inside a layer's backward, for the estimate."""
    flags = {"kernel": kernel, "chunked_layout": recipe.parallel.layout != "contiguous"}
    for s in SWITCHES:
        flags |= s.layer_flags(recipe)
    return LayerFlags(**flags)


def state_flags(recipe, cuda: bool) -> StateFlags:
    """Where the switches put the model states, for the estimate (cuda: a GPU run)."""
    flags = {}
    for s in SWITCHES:
        flags |= s.state_flags(recipe, cuda)
    return StateFlags(**flags)


def plan_words(recipe) -> str:
    return "".join(s.plan_words(recipe) for s in SWITCHES)


def remedy(recipe, item: Item) -> str | None:
    """The first switch's value that shrinks the plan's `item`, or None."""
    for s in SWITCHES:
        found = s.remedy(recipe, item)
        if found:
            return found
    return None


def table() -> str:
    """The docs' table of the switches (docs/memory.md, "The switches"), in SWITCHES order."""
    rows = ["| key | what it does | what it costs |", "|---|---|---|"]
    for s in SWITCHES:
        shown = f"{s.name}: {s.usage}" if s.usage else s.name
        rows.append(f"| `{shown}` | {s.does} | {s.costs} |")
    return "\n".join(rows)


def fixed_keys() -> tuple[str, ...]:
    """The switches a checkpoint resumes only under the same value of."""
    return tuple(s.name for s in SWITCHES if s.fixed_on_resume)


__all__ = [
    "SWITCHES",
    "ZERO_OFFLOAD",
    "Switch",
    "apply",
    "check_model",
    "check_recipe",
    "fixed_keys",
    "layer_flags",
    "plan_words",
    "remedy",
    "state_flags",
    "table",
]
