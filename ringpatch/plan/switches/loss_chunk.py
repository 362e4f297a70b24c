"""loss_chunk_tokens: the causal-LM loss a chunk of tokens at a time (the mechanism: hf/loss.py),
so a step never holds the whole sequence's vocabulary-wide logits."""

from __future__ import annotations

from typing import Annotated

from ringpatch.hf.loss import CHUNK_TOKENS
from ringpatch.plan.estimate import loss_chunk_bytes, norm_bytes
from ringpatch.plan.items import Item
from ringpatch.plan.switches.base import Switch
from ringpatch.schema import POSITIVE


class LossChunk(Switch):
    key = "loss_chunk_tokens"
    annotation = Annotated[int, POSITIVE]
    default = CHUNK_TOKENS
    doc = "Tokens per chunk of the chunked cross-entropy (the peak holds chunk x vocab float32 logits)."
    usage = "N"
    does = "the logits a chunk of N tokens at a time"
    costs = "none"
    fixed_on_resume = True

    def plan_words(self, recipe) -> str:
        n = recipe.loss_chunk_tokens
        return f", the loss over chunks of {n:,} tokens" if n != self.default else ""

    def plan_bytes(self, recipe, cfg: dict, s, tokens: int) -> dict[Item, float]:
        """A chunk's backward (loss_chunk_bytes), beside the final norm's saved tensors, which wait
        for the loss's backward to be done."""
        chunk = min(recipe.loss_chunk_tokens, tokens)
        final_norm = norm_bytes(s, recipe.rmsnorm == "chunked")[2]
        vocab, tp = cfg["vocab_size"], recipe.parallel.tp
        return {Item.LOSS_CHUNK: loss_chunk_bytes(vocab, s, tokens, chunk, tp) + tokens * final_norm}

    def remedy(self, recipe, item: Item) -> str | None:
        return f"loss_chunk_tokens: {max(256, recipe.loss_chunk_tokens // 4)}" if item is Item.LOSS_CHUNK else None


LOSS_CHUNK = LossChunk()
