"""The CUDA kernel calls, run on meta tensors: arguments parse and shapes come back right.

No GPU here, so this checks only the calls' signatures and shapes (PyTorch's meta kernels),
not their numerics; `make gpu-check` checks numerics on a GPU."""

from __future__ import annotations

import itertools

import pytest
import torch

from ringpatch.attention.blocks import Call
from ringpatch.attention.kernels import MaskSpec, TorchCUDA

pytestmark = pytest.mark.unit

CALLS = [Call(0, 16, 0, 16, "causal", 0, 0), Call(0, 16, 0, 8, "full", 32, 0), Call(0, 16, 0, 16, "band", 0, 0)]


@pytest.mark.parametrize(
    "dtype, call, dim", list(itertools.product([torch.bfloat16, torch.float16, torch.float32], CALLS, [64, 36]))
)
def test_torch_cuda_calls_on_meta(dtype, call, dim):
    """GQA (native for flash, repeated for the efficient kernel); head_dim 36 is padded to 40."""
    kernel = TorchCUDA()
    m, n = call.q1 - call.q0, call.k1 - call.k0
    q = torch.empty(2, m, 4, dim, dtype=dtype, device="meta")
    k = torch.empty(2, n, 2, dim, dtype=dtype, device="meta")
    out, lse = kernel.forward(q, k, k, call, MaskSpec(True, 8, 0.125))
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (2, m, 4) and lse.dtype == torch.float32
    dq, dk, dv = kernel.backward(torch.empty_like(out), q, k, k, out, lse, call, MaskSpec(True, 8, 0.125))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape


def test_torch_cuda_refuses_float64():
    with pytest.raises(ValueError, match=r"the CUDA kernels take float16, bfloat16 or float32, got torch.float64"):
        TorchCUDA().check(torch.empty(1, 8, 2, 16, dtype=torch.float64, device="meta"))
