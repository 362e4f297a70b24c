"""ringpatch: exact ring attention for long-context fine-tuning of Hugging Face causal LMs.

The package's layers, each importing only those above it in this list (tests/test_layers.py
checks it; docs/design.md has the map):

  attention/     ring attention: layouts, block planner, kernels, the ring (torch only)
  parallel/      the dp x (ring x ulysses) x tp grid and process start
  hf/            patch_model, shard_batch, RoPE rules, model-type tables
  memory/        chunked loss, the memory estimate
  integrations/  Trainer / TRL / PEFT glue
  data/          packing, sampler, preparation, tokenizer, demo corpus
  train/         recipes, preflight, the DeepSpeed trainer, checkpoints, export
  evaluate/      ring prefill scoring, perplexity vs length, passkey, reports
  cli.py, selfcheck.py   commands
"""

from ringpatch.attention import ring_attention, shard, ulysses_ring_group, unshard
from ringpatch.hf import patch_model, shard_batch, unpatch_model
from ringpatch.memory import causal_lm_loss, chunked_cross_entropy

__all__ = [
    "ring_attention",
    "shard",
    "unshard",
    "ulysses_ring_group",
    "patch_model",
    "unpatch_model",
    "shard_batch",
    "causal_lm_loss",
    "chunked_cross_entropy",
]
__version__ = "0.1.0"
