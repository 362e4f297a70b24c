"""rmsnorm: chunked. Every RMSNorm saves its input and 1/rms and recomputes its float32
intermediates in backward a chunk at a time (the mechanism: memory/rmsnorm.py)."""

from __future__ import annotations

from typing import Literal

from ringpatch.hf.models import RMSNORM_MODEL_TYPES
from ringpatch.memory.rmsnorm import chunk_rmsnorms
from ringpatch.plan.items import Item
from ringpatch.plan.switches.base import Switch


class ChunkedRMSNorm(Switch):
    key = "rmsnorm"
    annotation = Literal["stock", "chunked"]
    default = "stock"
    doc = (
        "chunked: every RMSNorm saves only its input and 1/rms and recomputes its float32 intermediates in "
        "backward, a chunk of tokens at a time (ringpatch/memory/rmsnorm.py): the stock norm's backward holds five "
        "float32 (tokens x hidden) temporaries, the largest part of a layer's backward once the MLP is tiled. Exact "
        "(float32 rounding), for one more normalization."
    )
    usage = "chunked"
    does = "each RMSNorm saves its input and 1/rms, recomputes the rest a chunk at a time"
    costs = "one more normalization"

    def check_model(self, recipe, model_config: dict) -> None:
        self.check_model_type(recipe, model_config, RMSNORM_MODEL_TYPES, "takes the RMSNorm")

    def apply(self, recipe, lm) -> dict:
        if recipe.rmsnorm == "chunked":
            chunk_rmsnorms(lm)
        return {}

    def layer_flags(self, recipe) -> dict:
        return {"chunked_norm": recipe.rmsnorm == "chunked"}

    def plan_words(self, recipe) -> str:
        return ", RMSNorm chunked" if recipe.rmsnorm == "chunked" else ""

    def remedy(self, recipe, item: Item) -> str | None:
        norm = item in (Item.FINAL_NORM_BACKWARD, Item.NORM_BACKWARD)
        return "rmsnorm: chunked" if norm and recipe.rmsnorm == "stock" else None


RMSNORM = ChunkedRMSNorm()
