"""Activation-checkpoint offload: recipe `activation_offload: true` (with activation_checkpointing).

With full-layer checkpointing, what a step keeps between forward and backward is each decoder
layer's input: layers x tokens x hidden, 32 GiB per GPU for Llama-3-8B at 1M tokens over 8 GPUs.
Offload keeps those inputs in host memory: each checkpointed layer call runs under saved-tensor
hooks that copy what autograd saves in that scope (for a non-reentrant checkpoint, exactly the
checkpoint's inputs) to the host in forward, and back to the device, as a fresh copy, when the
layer's backward needs it. Everything the layer computes is saved by the checkpoint's own hooks,
inside, and recomputed as before.

One path on every host: page-locked host memory where the inputs are on a GPU, and on a CPU the
same copies within one memory (so a CPU run, a simulated rank and a GPU run hold the same tensors).
Cost: one copy out and one copy back per layer, on the compute stream (docs/memory.md). Exact:
values are copied, never changed.

The page-locked buffers are sized exactly (HostBuffers): torch's pinned allocator rounds each block
up to a power of two, which at Llama-3-8B's 5M tokens on 8 GPUs (1.25 GiB a layer) would hold 2 GiB a
layer, 64 GiB a GPU more than the inputs. They are registered with CUDA once (cudaHostRegister, as
torch's own checkpoint staging does), kept for the process and taken again every step.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint

from ringpatch.regions import Region, within


class HostBuffers:
    """Host buffers of exactly the bytes they hold, for the offloaded layer inputs of a GPU run:
    page-locked once (`pin`, cudaHostRegister on CUDA) and taken again step after step, so the host
    holds the largest number alive at once (a step's checkpointed layers) of each size, and no more.
    A buffer comes back (`give`) when autograd drops what the layer's backward restored; before it is
    written again, the stream waits for the copy that last read it. Buffers of another size (the
    previous stage's) are released when a new size is asked for and none of that size is free."""

    def __init__(self, pin=None, unpin=None):
        self.pin = pin if pin is not None else _cuda_register
        self.unpin = unpin if unpin is not None else _cuda_unregister
        self.free: dict[tuple, list] = {}
        self.held_bytes = 0  # page-locked now, in use or free
        self.registered = 0  # buffers made (each registered once)

    def take(self, size: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        key = (tuple(size), dtype)
        free = self.free.get(key)
        if free:
            host, done = free.pop()
            if done is not None:
                torch.cuda.current_stream().wait_event(done)
            return host
        self._release_other_sizes(key)
        host = torch.empty(size, dtype=dtype)
        self.pin(host)
        self.held_bytes += host.nbytes
        self.registered += 1
        return host

    def give(self, host: torch.Tensor, done) -> None:
        self.free.setdefault((tuple(host.size()), host.dtype), []).append((host, done))

    def _release_other_sizes(self, key: tuple) -> None:
        for other in [k for k in self.free if k != key]:
            for host, done in self.free.pop(other):
                if done is not None:
                    done.synchronize()
                self.unpin(host)
                self.held_bytes -= host.nbytes


def _cuda_register(host: torch.Tensor) -> None:
    code = int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.nbytes, 1))  # 1: Portable, as torch
    if code != 0:
        raise RuntimeError(
            f"activation_offload: page-locking {host.nbytes / 2**30:.2f} GiB of host memory failed (cudaError {code}): "
            "the host may be out of memory or the locked-memory limit too low (`ulimit -l`); `ringpatch plan "
            "--max-context` prints the host memory the offload needs per GPU"
        )


def _cuda_unregister(host: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(host.data_ptr())


HOST_BUFFERS = HostBuffers()


class _Offloaded:
    """A layer input in a HostBuffers buffer; the buffer goes back when autograd drops this."""

    def __init__(self, device: torch.device, host: torch.Tensor, buffers: HostBuffers):
        self.device, self.host, self.buffers, self.done = device, host, buffers, None

    def restore(self) -> torch.Tensor:
        out = self.host.to(self.device, non_blocking=True, copy=True)
        if self.device.type == "cuda":
            self.done = torch.cuda.Event()
            self.done.record()
        return out

    def __del__(self):
        self.buffers.give(self.host, self.done)


def _pooled(t: torch.Tensor) -> bool:
    """Whether `t` goes to a HostBuffers buffer (a GPU tensor) or to a plain host tensor."""
    return t.device.type == "cuda" and not _plain_copies


@within(Region.OFFLOAD)
def _to_host(t: torch.Tensor):
    if _pooled(t):
        host = HOST_BUFFERS.take(t.size(), t.dtype)
        host.copy_(t, non_blocking=True)
        return _Offloaded(t.device, host, HOST_BUFFERS)
    host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout)
    host.copy_(t)
    return t.device, host


def _from_host(packed) -> torch.Tensor:
    if isinstance(packed, _Offloaded):
        return packed.restore()
    device, host = packed
    return host.to(device, copy=True)


_plain_copies = False


@contextlib.contextmanager
def plain_host_copies():
    """Offloaded inputs in plain host tensors, wherever they come from: for a rank simulated on
    fake tensors (which have no memory to register)."""
    global _plain_copies
    before, _plain_copies = _plain_copies, True
    try:
        yield
    finally:
        _plain_copies = before


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
