"""Activation-checkpoint offload: recipe `activation_offload: true` (with activation_checkpointing).

With full-layer checkpointing, what a step keeps between forward and backward is each decoder
layer's input: layers x tokens x hidden, 32 GiB per GPU for Llama-3-8B at 1M tokens over 8 GPUs.
Offload keeps those inputs in host memory: each checkpointed layer call runs under saved-tensor
hooks that copy what autograd saves in that scope (for a non-reentrant checkpoint, exactly the
checkpoint's inputs) to the host in forward, and back to the device, as a fresh copy, when the
layer's backward needs it. Everything the layer computes is saved by the checkpoint's own hooks,
inside, and recomputed as before.

One path on every host: pinned host memory where CUDA is, and on a CPU the same copies within one
memory (so a CPU run, a simulated rank and a GPU run hold the same tensors). Cost: one copy out and
one copy back per layer, on the compute stream (docs/memory.md). Exact: values are copied, never
changed.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def _to_host(t: torch.Tensor):
    pinned = torch.cuda.is_available()
    host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pinned)
    host.copy_(t, non_blocking=pinned)
    return t.device, host


def _from_host(packed) -> torch.Tensor:
    device, host = packed
    return host.to(device, non_blocking=host.is_pinned(), copy=True)


def offloaded_checkpoint(function, *args, **kwargs):
    """torch.utils.checkpoint.checkpoint with the checkpoint's inputs held on the host."""
    with torch.autograd.graph.saved_tensors_hooks(_to_host, _from_host):
        return checkpoint(function, *args, **kwargs)


def enable_checkpointing(lm, offload: bool = False) -> None:
    """Full-layer activation checkpointing (non-reentrant) on a transformers model; with
    `offload`, the checkpointed layers' inputs live on the host between forward and backward.
    The checkpoint function goes in through transformers' _set_gradient_checkpointing, the hook
    gradient_checkpointing_enable itself uses (docs/private-apis.md)."""
    kwargs = {"use_reentrant": False}
    enable = getattr(lm, "activation_checkpointing_enable", None)  # the name from transformers 5.x on
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if offload:
        lm._set_gradient_checkpointing(
            enable=True, gradient_checkpointing_func=functools.partial(offloaded_checkpoint, **kwargs)
        )
