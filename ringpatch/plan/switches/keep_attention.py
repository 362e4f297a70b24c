"""keep_attention: attention-aware checkpointing. Each layer's attention output and log-sum-exp
are kept from forward, so the checkpoint's recompute skips the ring's forward
(attention/ring.py, KeptAttention; patch_model(keep_attention=True))."""

from __future__ import annotations

from ringpatch.plan.items import Item
from ringpatch.plan.switches.base import Switch


class KeepAttention(Switch):
    key = "keep_attention"
    annotation = bool
    default = False
    doc = (
        "Attention-aware checkpointing: keep each layer's attention output (and its log-sum-exp) from forward, so "
        "the checkpoint's recompute in backward skips the ring forward, the costliest part of a layer at long "
        "context (attention/ring.py, KeptAttention). Costs layers x tokens x hidden of memory per rank, about what "
        "the checkpointed layer inputs take. Needs activation_checkpointing."
    )
    does = "keeps each layer's attention output for the recompute, which then skips the ring's forward"
    costs = "one attention output per layer"
    needs_checkpointing = ("keeps attention outputs for the recompute of checkpointed layers", "nothing is recomputed")

    def apply(self, recipe, lm) -> dict:
        return {"keep_attention": recipe.keep_attention}

    def layer_flags(self, recipe) -> dict:
        return {"keep": recipe.keep_attention}

    def plan_words(self, recipe) -> str:
        return ", attention outputs kept for the recompute" if recipe.keep_attention else ""

    def plan_bytes(self, recipe, cfg: dict, s, tokens: int) -> dict[Item, float]:
        """Per layer: the attention output and the float32 log-sum-exp of each query head."""
        if not recipe.keep_attention:
            return {}
        return {Item.KEPT_ATTENTION: cfg["num_hidden_layers"] * tokens * (s.q * s.b + 4 * s.heads)}

    def remedy(self, recipe, item: Item) -> str | None:
        return "keep_attention: false" if item is Item.KEPT_ATTENTION else None


KEEP_ATTENTION = KeepAttention()
