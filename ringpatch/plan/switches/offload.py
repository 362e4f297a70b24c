"""activation_offload: the checkpointed layer inputs in (pinned) host memory between forward and
backward (the mechanism: memory/offload.py; applied with activation_checkpointing)."""

from __future__ import annotations

from ringpatch.plan.estimate import offloaded_bytes
from ringpatch.plan.items import Item
from ringpatch.plan.switches.base import Switch


class ActivationOffload(Switch):
    key = "activation_offload"
    annotation = bool
    default = False
    doc = (
        "Keep the checkpointed layer inputs in pinned host memory between forward and backward "
        "(ringpatch/memory/offload.py): frees layers x tokens x hidden of GPU memory per rank for one copy out and "
        "one copy back per layer. Needs activation_checkpointing."
    )
    does = "the layer inputs in page-locked host memory"
    costs = "a copy out and a copy back per layer, on the compute stream; host memory, exactly the inputs' bytes"
    needs_checkpointing = ("moves the checkpointed layer inputs to the host", "there are none")

    # apply: the checkpoint function itself, set by activation_checkpointing

    def layer_flags(self, recipe) -> dict:
        return {"offload": recipe.activation_offload and recipe.activation_checkpointing}

    def plan_words(self, recipe) -> str:
        return " (layer inputs offloaded to host memory)" if recipe.activation_offload else ""

    def host_bytes(self, recipe, cfg: dict, tokens: int, b: int) -> float:
        return offloaded_bytes(cfg, tokens, b) if recipe.activation_offload else 0.0

    def remedy(self, recipe, item: Item) -> str | None:
        if item is Item.CHECKPOINTED and recipe.activation_checkpointing and not recipe.activation_offload:
            return "activation_offload: true"
        return None


ACTIVATION_OFFLOAD = ActivationOffload()
