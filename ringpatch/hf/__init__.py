"""Hugging Face transformers integration.

  patch.py      patch_model / unpatch_model
  interface.py  the entries registered in transformers' AttentionInterface and mask interface
  settings.py   what patch_model leaves on a model; the check that a batch is this rank's part
  batch.py      shard_batch: a full-sequence batch -> this rank's part, labels shifted first
  documents.py  where packed documents start, from position_ids resets, cu_seq_lens or seq_idx
  models.py     model-type tables: supported transformers releases, features the ring refuses
  rope.py       RoPE rules for context-extension stages (NTK-aware), applied to a loaded model

Imports ringpatch.attention and ringpatch.parallel; transformers is imported where it is used.
"""

from ringpatch.hf.batch import IGNORE_INDEX, shard_batch
from ringpatch.hf.patch import patch_model, unpatch_model

__all__ = ["patch_model", "unpatch_model", "shard_batch", "IGNORE_INDEX"]
