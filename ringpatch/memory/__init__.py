"""What bounds memory at long context, and the estimate of it.

  offload.py   activation-checkpoint offload: the checkpointed layer inputs in host memory
  rmsnorm.py   the chunked RMSNorm
  estimate.py  the bytes of a step's tensors by phase (train/plan.py's estimate adds them up per recipe)
  reserve.py   DeepSpeed's buffers and what no tensor shows
  tracker.py   the allocation tracker of the simulated rank; census.py, live tensors by category
  traffic.py   sequence-parallel communication per GPU, ring alone vs Ulysses x ring

The chunked loss lives in hf/loss.py. Each memory feature is one recipe switch, one module of
train/switches/, exact, and counted by the plan.
"""

from ringpatch.hf.loss import causal_lm_loss, chunked_cross_entropy

__all__ = ["causal_lm_loss", "chunked_cross_entropy"]
