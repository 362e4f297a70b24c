"""ringpatch: exact ring attention for long-context fine-tuning of Hugging Face causal LMs."""

from ringpatch.attention import ring_attention
from ringpatch.layout import shard, unshard

__all__ = ["ring_attention", "shard", "unshard"]
__version__ = "0.1.0"
