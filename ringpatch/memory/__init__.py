"""The mechanisms that shrink a long-context step's memory.

  offload.py   activation-checkpoint offload: the checkpointed layer inputs in page-locked host memory
  rmsnorm.py   the chunked RMSNorm

The chunked loss lives in hf/loss.py. Each memory feature is one recipe switch, one module of
plan/switches/, exact, and counted by the plan (ringpatch/plan).
"""

from ringpatch.hf.loss import causal_lm_loss, chunked_cross_entropy

__all__ = ["causal_lm_loss", "chunked_cross_entropy"]
