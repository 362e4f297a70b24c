"""The model and batch of a plan, as the trainer builds them and the simulated rank runs them: a
causal LM from its config, the recipe's memory switches and the ring applied to it, the loss
module DeepSpeed and FSDP2 wrap, and a rank's part of a batch of packed rows."""

from __future__ import annotations

import torch

import ringpatch
from ringpatch.hf.architecture import head_counts
from ringpatch.hf.loss import CHUNK_TOKENS, causal_lm_loss
from ringpatch.parallel import Mesh
from ringpatch.plan import switches
from ringpatch.plan.budget import Plan


def lm_from_config(config: dict, bf16: bool):
    """A causal LM of this architecture with random weights (the simulator builds it on fake tensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.bfloat16 if bf16 else torch.float32
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=dtype)


def prepare_lm(plan: Plan, lm, mesh: Mesh, backend="auto"):
    """The recipe's memory switches and the ring, applied to a loaded LM (in place; returns it)."""
    plan.dims.check_heads(*head_counts(lm.config))  # the loaded model's, which preflight may not have seen
    lm.config.use_cache = False
    # from_pretrained returns a model in eval mode, where transformers skips activation checkpointing
    # (and dropout): the first stage of every pretrained run held every layer's activations
    lm.train()
    kwargs = switches.apply(plan.recipe, lm)
    return ringpatch.patch_model(
        lm, group=mesh.seq_group, layout=plan.recipe.parallel.layout, backend=backend, **kwargs
    )


class LossModel(torch.nn.Module):
    """The causal LM whose forward is the chunked cross-entropy of shard_batch's output, so
    DeepSpeed (and ZeRO-3's parameter hooks) see the whole loss, head included, in one forward."""

    def __init__(self, lm, chunk_tokens: int = CHUNK_TOKENS):
        super().__init__()
        self.lm = lm
        self.config = lm.config  # AutoTP reads the architecture from here
        self.chunk_tokens = chunk_tokens

    def forward(self, **batch):
        return causal_lm_loss(self.lm, batch, chunk_tokens=self.chunk_tokens)


def local_batch(rows: dict[str, torch.Tensor], recipe, mesh) -> dict[str, torch.Tensor]:
    """This rank's part of packed rows (input_ids, doc_position_ids), labelled for the causal-LM
    loss. With document masking the documents stay apart and their positions restart
    (shard_batch reads the resets)."""
    batch = {"input_ids": rows["input_ids"], "labels": rows["input_ids"]}
    if recipe.data.document_masking:
        batch["position_ids"] = rows["doc_position_ids"]
    return ringpatch.shard_batch(batch, group=mesh.seq_group, layout=recipe.parallel.layout)
