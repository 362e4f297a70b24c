"""ringpatch: exact ring attention for long-context fine-tuning of Hugging Face causal LMs.

The package's layers, each importing only those above it in this list (tests/test_layers.py
checks it; docs/design.md has the map):

  errors.py, schema.py   user-error types; the recipe schema's markers and checks
  attention/     ring attention: layouts, block planner, kernels, the ring (torch only)
  parallel/      the dp x (ring x ulysses) x tp grid and process start
  hf/            patch_model, shard_batch, RoPE rules, model-type tables
  memory/        chunked loss, the memory estimate
  integrations/  Trainer / TRL / PEFT glue
  data/          packing, sampler, preparation, tokenizer, demo corpus
  evaluate/      ring prefill scoring; the tasks (perplexity, passkey, RULER), one module each
  train/         recipes, the memory switches (one module each), preflight, the DeepSpeed
                 trainer, checkpoints, export
  cli.py, selfcheck.py and each layer's command.py / __main__.py   commands (may import every layer)
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
