"""The contract of a memory switch (switches/__init__.py lists them)."""

from __future__ import annotations

from typing import Any

from ringpatch.errors import BadValue
from ringpatch.plan.items import Item
from ringpatch.schema import Key


def _yaml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


class Switch:
    """One recipe key. Subclasses set the class attributes and override what they need; every
    method takes the validated recipe (and never changes it)."""

    key: str
    section: str = ""
    """The recipe section holding the key ("zero" for zero.offload); empty: a top-level key."""
    annotation: Any
    """The recipe field's type, with its schema markers (ringpatch/schema.py)."""
    default: Any
    doc: str
    """The recipe field's description (`ringpatch recipe --schema`)."""
    usage: str = ""
    """How the docs' table shows a value (`mlp_tiles: N`); empty: the key alone."""
    does: str
    """What it does, for the docs' table (docs/memory.md, written by `python -m ringpatch.plan.switches`)."""
    costs: str
    """What it costs, for the same table."""
    fixed_on_resume: bool = False
    """A checkpoint resumes only under the value it was written with."""
    needs_checkpointing: tuple[str, str] | None = None
    """For a switch that acts on checkpointed layers: (what it does with them, what that leaves
    to do without checkpointing), the words of the refusal when activation_checkpointing is off."""

    @property
    def name(self) -> str:
        """The dotted key, as the recipe, its messages and the docs write it."""
        return f"{self.section}.{self.key}" if self.section else self.key

    def recipe_key(self) -> Key:
        return Key(self.key, self.annotation, self.default, self.doc)

    def value(self, recipe):
        return getattr(getattr(recipe, self.section) if self.section else recipe, self.key)

    def on(self, recipe) -> bool:
        return self.value(recipe) != self.default

    def check(self, recipe) -> None:
        """Against the recipe's other keys; raises ValueError naming the keys and the fix."""
        if self.needs_checkpointing and self.on(recipe) and not recipe.activation_checkpointing:
            does, without = self.needs_checkpointing
            raise BadValue(
                f"{self.name}: {_yaml(self.value(recipe))} {does}, but activation_checkpointing is false, so "
                f"{without}: set activation_checkpointing: true, or {self.name}: {_yaml(self.default)}"
            )

    def check_model(self, recipe, model_config: dict) -> None:
        """Against the architecture (preflight, before any download)."""

    def apply(self, recipe, lm) -> dict:
        """To a loaded LM in place, before patch_model; returns patch_model keyword arguments."""
        return {}

    def plan_words(self, recipe) -> str:
        """Its words in the plan's first line (", ..." or ""), in SWITCHES order."""
        return ""

    def layer_flags(self, recipe) -> dict:
        """Its fields of plan.estimate.LayerFlags: what it changes inside a layer's backward."""
        return {}

    def state_flags(self, recipe, cuda: bool) -> dict:
        """Its fields of plan.estimate.StateFlags: where the model states live (cuda: a GPU run;
        on a CPU run the host is the device)."""
        return {}

    def plan_bytes(self, recipe, cfg: dict, s, tokens: int) -> dict[Item, float]:
        """Its own items of the memory plan, bytes per GPU (s: estimate.Shapes); each Item's phase says
        when in the step it is live (held through the step, or one of the backwards)."""
        return {}

    def host_bytes(self, recipe, cfg: dict, tokens: int, b: int) -> float:
        """Host memory it holds per GPU, in bytes."""
        return 0.0

    def remedy(self, recipe, item: Item) -> str | None:
        """The value of this key that would shrink the plan's `item` (None: it does not)."""
        return None

    def check_model_type(self, recipe, model_config: dict, supported: tuple[str, ...], what: str) -> None:
        """Raise when the switch is on and the architecture is not one of `supported` (what: the
        part of those models it takes)."""
        model_type = model_config.get("model_type")
        if self.on(recipe) and model_type not in supported:
            raise BadValue(
                f"{self.name}: {_yaml(self.value(recipe))} {what} of {', '.join(supported)}; {recipe.model.name} "
                f"is {model_type!r}: set {self.name}: {_yaml(self.default)}"
            )
