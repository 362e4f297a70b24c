"""What bounds memory at long context, and the estimate of it.

  loss.py      chunked cross-entropy: never the full-vocabulary logits of the local sequence
  offload.py   activation-checkpoint offload: the checkpointed layer inputs in host memory
  estimate.py  the per-GPU memory estimate of a recipe (the planner's numbers)
  traffic.py   sequence-parallel communication per GPU, ring alone vs Ulysses x ring

The sequence-tiled MLP lives in train/switches/mlp_tiles.py (it uses DeepSpeed's TiledMLP). Each memory
feature is one recipe switch, exact, and counted by estimate.py.
"""

from ringpatch.hf.loss import causal_lm_loss, chunked_cross_entropy

__all__ = ["causal_lm_loss", "chunked_cross_entropy"]
