"""What bounds memory at long context, and the estimate of it.

  loss.py      chunked cross-entropy: never the full-vocabulary logits of the local sequence
  estimate.py  the per-GPU memory estimate of a recipe (the planner's numbers)

Later: activation offload, attention-aware checkpointing, tiled MLP. Each is one recipe
switch, exact, and counted by estimate.py.
"""

from ringpatch.memory.loss import causal_lm_loss, chunked_cross_entropy

__all__ = ["causal_lm_loss", "chunked_cross_entropy"]
