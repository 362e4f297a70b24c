"""Activation-checkpoint offload: recipe `activation_offload: true` (with activation_checkpointing).

With full-layer checkpointing, what a step keeps between forward and backward is each decoder
layer's input: layers x tokens x hidden, 32 GiB per GPU for Llama-3-8B at 1M tokens over 8 GPUs,
more than anything else the step holds. Offload keeps those inputs in (pinned) host memory: each
checkpointed layer call runs under torch.autograd.graph.save_on_cpu, which copies what autograd
saves in that scope to the host in forward and back to the device when backward needs it. For a
non-reentrant checkpoint that is exactly the checkpoint's inputs (the hidden states, and the RoPE
cos/sin the layer is given); everything the layer computes is saved by the checkpoint's own
hooks, inside, and recomputed as before.

Cost: one device-to-host copy of each layer's inputs in forward and one host-to-device copy in
backward, on the compute stream (not overlapped; a side stream with prefetch is worth it only if
a GPU measurement shows the copies above 5% of the step). Host memory: the inputs of every
layer of every rank of the node. Exact: the values are copied, never changed.

transformers provides this as activation_checkpointing_enable(offload=True) in recent releases,
used here on CUDA. On releases without it (5.0), and on hosts without an accelerator, the same
checkpoint function is installed through the model's _set_gradient_checkpointing, the hook
transformers itself uses: transformers 5.24 asks for pinned memory whenever offload is on, which
torch refuses on a CPU-only host ("pin_memory=True requires a CUDA or other accelerator
backend"), and on the CPU there is nothing to move anyway (the copy keeps the run exact and
testable).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch.utils.checkpoint import checkpoint


def _offloaded_checkpoint(function, *args, **kwargs):
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return checkpoint(function, *args, **kwargs)


def enable_checkpointing(lm, offload: bool = False) -> None:
    """Full-layer activation checkpointing (non-reentrant) on a transformers model; with
    `offload`, the checkpointed layers' inputs live on the host between forward and backward."""
    modern = getattr(lm, "activation_checkpointing_enable", None)
    if torch.cuda.is_available() and modern is not None and "offload" in inspect.signature(modern).parameters:
        modern(activation_checkpointing_kwargs={"use_reentrant": False}, offload=offload)
    else:
        enable_by_hand(lm, offload)


def enable_by_hand(lm, offload: bool) -> None:
    """For transformers releases without activation_checkpointing_enable(offload=...)."""
    kwargs = {"use_reentrant": False}
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if offload:
        lm._set_gradient_checkpointing(
            enable=True, gradient_checkpointing_func=functools.partial(_offloaded_checkpoint, **kwargs)
        )
