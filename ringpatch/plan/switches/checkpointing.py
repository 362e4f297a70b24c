"""activation_checkpointing: keep one input per decoder layer, recompute the layer in backward."""

from __future__ import annotations

from ringpatch.memory.offload import enable_checkpointing
from ringpatch.plan.estimate import layer_saved_bytes
from ringpatch.plan.items import Item
from ringpatch.plan.switches.base import Switch


class ActivationCheckpointing(Switch):
    key = "activation_checkpointing"
    annotation = bool
    default = True
    doc = "Keep one input per decoder layer and recompute the layer in backward (non-reentrant)."
    does = "keeps one input per layer, recomputes the layer in backward"
    costs = "one more forward"
    fixed_on_resume = True

    def apply(self, recipe, lm) -> dict:
        if recipe.activation_checkpointing:
            enable_checkpointing(lm, offload=recipe.activation_offload)
        return {}

    def plan_words(self, recipe) -> str:
        return f", activation checkpointing {'on' if recipe.activation_checkpointing else 'off'}"

    def plan_bytes(self, recipe, cfg: dict, s, tokens: int) -> dict[Item, float]:
        """Every layer's input (none on the device when offloaded), or without checkpointing every
        tensor each layer saves; and RoPE's cos and sin, which the layers share."""
        layers, rope = cfg["num_hidden_layers"], 2 * s.d * s.b
        if not recipe.activation_checkpointing:
            chunked, ulysses = recipe.rmsnorm == "chunked", recipe.parallel.ulysses
            per_layer = layer_saved_bytes(cfg, recipe.parallel.tp, s.b, chunked_norm=chunked, ulysses=ulysses)
        elif recipe.activation_offload:
            per_layer = 0
        else:
            per_layer = s.h * s.b
        return {Item.CHECKPOINTED: tokens * (layers * per_layer + rope)}

    def remedy(self, recipe, item: Item) -> str | None:
        if item is Item.CHECKPOINTED and not recipe.activation_checkpointing:
            return "activation_checkpointing: true"
        return None


ACTIVATION_CHECKPOINTING = ActivationCheckpointing()
