"""A causal-LM loss that never holds the full-vocabulary logits of the whole local sequence.

At long context the logits (tokens x vocab, float32) are the largest tensor of a training
step: 32K tokens x 128K vocab is 16 GiB. chunked_cross_entropy computes them per chunk of
tokens and recomputes each chunk in backward (activation checkpointing per chunk), so the
peak is one chunk's logits. Its value and gradients equal the plain loss's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ringpatch.attention.comm import SumOverGroup
from ringpatch.errors import BadValue, Unsupported
from ringpatch.hf.batch import AGREED_KEY, DOCUMENTS_KEY, IGNORE_INDEX
from ringpatch.hf.models import PLAIN_HEAD_MODEL_TYPES
from ringpatch.hf.settings import check_local_batch
from ringpatch.regions import Region, within

CHUNK_TOKENS = 4096
"""Tokens per chunk by default (recipe key loss_chunk_tokens): the peak holds chunk x vocab
float32 logits, 2 GiB at Llama-3's 128K vocabulary."""


@within(Region.LOSS)
def _chunk_loss_sum(hidden, weight, bias, labels):
    logits = F.linear(hidden, weight, bias)  # (n, V): one chunk only
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits upcast, as HF does
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


@within(Region.LOSS)
def chunked_cross_entropy(hidden, weight, labels, bias=None, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Sum over tokens of cross_entropy(hidden @ weight.T + bias, labels), -100 ignored.

    hidden (..., D), labels (...) already shifted; returns a float32 (or float64) scalar (a sum: divide
    by the number of predicted tokens for the mean)."""
    if chunk_tokens < 1:
        raise BadValue(f"chunk_tokens must be positive, got {chunk_tokens}")
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    labels = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_loss_sum, hidden[part], weight, bias, labels[part], use_reentrant=False)
    return total


def causal_lm_loss(model, batch: dict, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """The full-sequence loss of a ring-patched causal LM on shard_batch's output, computed
    with chunked_cross_entropy. Equal to `model(**batch).loss` without its logits."""
    config = model.config
    if config.model_type not in PLAIN_HEAD_MODEL_TYPES:
        raise Unsupported(
            f"causal_lm_loss knows the head of {', '.join(PLAIN_HEAD_MODEL_TYPES)}; model type "
            f"{config.model_type!r} may scale or cap its logits: use model(**batch).loss"
        )
    missing = [k for k in ("input_ids", "position_ids", "shift_labels", "num_items_in_batch") if k not in batch]
    if missing:
        raise BadValue(f"batch lacks {missing}: pass the output of ringpatch.shard_batch with labels")
    settings = getattr(model, "_ringpatch", None)
    documents = batch.get(DOCUMENTS_KEY)
    extra = {}
    if settings is not None:
        documents = check_local_batch(settings, batch["input_ids"].shape[1], batch["position_ids"], documents)
        extra[AGREED_KEY] = True
    elif documents is not None:
        raise BadValue(
            "the batch packs documents (ring_cu_seqlens), which only a ring-patched model keeps apart: "
            "call ringpatch.patch_model(model) first"
        )
    if documents is not None:
        extra[DOCUMENTS_KEY] = documents
    body = model.get_decoder()
    hidden = body(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **extra)
    hidden = hidden.last_hidden_state
    head = model.get_output_embeddings()
    loss = chunked_cross_entropy(hidden, head.weight, batch["shift_labels"], head.bias, chunk_tokens)
    loss = loss / batch["num_items_in_batch"].to(loss.device)
    if settings is not None and settings.sp_size > 1:
        loss = SumOverGroup.apply(loss, settings.group)
    return loss
