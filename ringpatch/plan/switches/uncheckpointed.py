"""uncheckpointed_layers: N. The first N decoder layers run without activation checkpointing: they
keep what their backward needs instead of recomputing it, so a step runs N layer forwards fewer,
for the memory a whole layer saves (Megatron-LM's recompute_num_layers, the other way round).
Use it when `ringpatch plan` leaves memory free.

The first layers, not the last: backward reaches them last, so what they save is held through
every checkpointed layer's backward, and the plan's held item is the whole cost. Exact: a layer's
backward is the same whether its tensors were kept or recomputed."""

from __future__ import annotations

from typing import Annotated

from ringpatch.errors import BadValue, Unsupported
from ringpatch.plan.estimate import layer_saved_bytes
from ringpatch.plan.items import Item
from ringpatch.plan.switches.base import Switch
from ringpatch.schema import NONNEGATIVE


class UncheckpointedLayers(Switch):
    key = "uncheckpointed_layers"
    annotation = Annotated[int, NONNEGATIVE]
    default = 0
    doc = (
        "The first N decoder layers keep their activations instead of being checkpointed: N layer forwards fewer "
        "per step, for what N whole layers save (ringpatch plan's item 'uncheckpointed layers'). Needs "
        "activation_checkpointing and fewer layers than the model has."
    )
    usage = "N"
    does = "the first N layers keep what their backward needs instead of being checkpointed"
    costs = 'what N whole layers save (plan item "uncheckpointed layers"); N layer forwards fewer per step'

    needs_checkpointing = ("leaves layers out of activation checkpointing", "none is checkpointed")

    def check(self, recipe) -> None:
        super().check(recipe)
        n = recipe.uncheckpointed_layers
        if n and recipe.keep_attention:
            raise BadValue(
                f"uncheckpointed_layers: {n} with keep_attention: true: kept attention outputs serve the recompute "
                "of checkpointed layers, and an uncheckpointed layer would hold its output twice; choose one"
            )

    def check_model(self, recipe, model_config: dict) -> None:
        self._check_layers(recipe.uncheckpointed_layers, model_config.get("num_hidden_layers"), recipe.model.name)

    @staticmethod
    def _check_layers(n: int, layers: int | None, name: str) -> None:
        if n and layers is not None and n >= layers:
            raise BadValue(
                f"uncheckpointed_layers: {n}, but {name} has {layers} decoder layers: leave at least one checkpointed "
                f"(at most {layers - 1}), or set activation_checkpointing: false to keep every layer"
            )

    def apply(self, recipe, lm) -> dict:
        n = recipe.uncheckpointed_layers
        if n:
            layers = lm.get_decoder().layers
            self._check_layers(n, len(layers), type(lm).__name__)
            for layer in list(layers)[:n]:
                # transformers' GradientCheckpointingLayer checkpoints a layer only while this is set;
                # a layer without the flag would ignore the switch, so it is refused
                if not isinstance(getattr(layer, "gradient_checkpointing", None), bool):
                    raise Unsupported(
                        f"uncheckpointed_layers: {n}, but {type(layer).__name__} has no gradient_checkpointing flag "
                        "(transformers' GradientCheckpointingLayer) to turn off: set uncheckpointed_layers: 0"
                    )
                layer.gradient_checkpointing = False
        return {}

    def plan_words(self, recipe) -> str:
        n = recipe.uncheckpointed_layers
        return f", the first {n} layer{'s' if n > 1 else ''} not checkpointed" if n else ""

    def plan_bytes(self, recipe, cfg: dict, s, tokens: int) -> dict[Item, float]:
        """What each such layer saves for its backward, less the input a checkpointed layer would
        have held on the device (counted by activation_checkpointing's item)."""
        n = recipe.uncheckpointed_layers
        if not n:
            return {}
        chunked = recipe.rmsnorm == "chunked"
        saved = layer_saved_bytes(cfg, recipe.parallel.tp, s.b, recipe.mlp_tiles > 1, chunked, recipe.parallel.ulysses)
        checkpoint_input = 0 if recipe.activation_offload else s.h * s.b
        return {Item.UNCHECKPOINTED: n * tokens * (saved - checkpoint_input)}

    def remedy(self, recipe, item: Item) -> str | None:
        if item is Item.UNCHECKPOINTED:
            return f"uncheckpointed_layers: {recipe.uncheckpointed_layers // 2}"
        return None


UNCHECKPOINTED_LAYERS = UncheckpointedLayers()
