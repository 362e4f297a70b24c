"""Local block backends behind one protocol (base.Kernel), one module per backend:

  torch_cpu    PyTorch's fused CPU flash kernel (any float dtype, computed in float32)
  torch_cuda   PyTorch's fused CUDA kernels: flash for full/causal blocks, memory-efficient for masked ones
  flash_attn2  flash-attn 2: bf16/fp16, native GQA and sliding windows

`select` resolves a backend name for the tensors at hand, once, at the public entry.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from ringpatch.attention.kernels.base import INDEX_EDGE, Kernel, MaskSpec
from ringpatch.attention.kernels.flash_attn2 import FlashAttn
from ringpatch.attention.kernels.flash_attn2 import unavailable as flash_unavailable
from ringpatch.attention.kernels.torch_cpu import TorchCPU
from ringpatch.attention.kernels.torch_cuda import TorchCUDA
from ringpatch.errors import BadValue

Backend = Literal["auto", "torch", "flash_attn"]
BACKENDS: tuple[str, ...] = get_args(Backend)


def is_kernel(backend) -> bool:
    """A kernel object (base.Kernel) given in place of a backend name."""
    return all(callable(getattr(backend, name, None)) for name in ("check", "forward", "backward"))


def check_backend(backend) -> None:
    if not is_kernel(backend) and backend not in BACKENDS:
        raise BadValue(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}, or pass a kernel object")


def select(backend, q: torch.Tensor) -> Kernel:
    """Resolve `backend` (a name, or a kernel object used as is) for tensors like `q`; raises if it
    cannot serve them."""
    check_backend(backend)
    if is_kernel(backend):
        backend.check(q)
        return backend
    if backend == "auto":
        if q.device.type == "cuda" and flash_unavailable() is None:
            try:
                FlashAttn().check(q)
                return FlashAttn()
            except ValueError:
                pass
        backend = "torch"
    if backend == "flash_attn":
        kernel = FlashAttn()
    elif q.device.type == "cpu":
        kernel = TorchCPU()
    elif q.device.type == "cuda":
        kernel = TorchCUDA()
    else:
        raise BadValue(f"backend 'torch' has no kernel for device {q.device}; ringpatch runs on CPU and CUDA")
    kernel.check(q)
    return kernel


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


__all__ = [
    "Backend",
    "BACKENDS",
    "Kernel",
    "MaskSpec",
    "FlashAttn",
    "INDEX_EDGE",
    "TorchCPU",
    "TorchCUDA",
    "check_backend",
    "select",
    "default_scale",
]
