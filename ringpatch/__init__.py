"""ringpatch: exact ring attention for long-context fine-tuning of Hugging Face causal LMs."""

from ringpatch.attention import ring_attention
from ringpatch.batch import shard_batch
from ringpatch.hf import patch_model, unpatch_model
from ringpatch.layout import shard, unshard
from ringpatch.loss import causal_lm_loss, chunked_cross_entropy

__all__ = [
    "ring_attention",
    "shard",
    "unshard",
    "patch_model",
    "unpatch_model",
    "shard_batch",
    "causal_lm_loss",
    "chunked_cross_entropy",
]
__version__ = "0.1.0"
