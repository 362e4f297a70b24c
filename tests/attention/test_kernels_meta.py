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

CALLS = [
    Call(0, 16, 0, 16, "causal", 0, 0),
    Call(0, 16, 0, 8, "full", 32, 0),
    Call(0, 16, 0, 16, "band", 0, 0),
    Call(0, 16, 0, 16, "causal", 0, 0, (3, 4, 11), (3, 4, 11)),  # varlen: four documents on the diagonal
    Call(0, 16, 0, 12, "full", 40, 20, (5,), (7,)),  # varlen: two documents' earlier keys
]


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


def test_a_varlen_call_is_one_flash_call_with_cumulative_lengths(monkeypatch):
    """bf16: the documents of a varlen call go to aten._flash_attention_forward/_backward once,
    packed (rows x tokens, heads, dim), with int32 cumulative lengths over both batch rows."""
    seen = []
    for name in ("_flash_attention_forward", "_flash_attention_backward"):
        op = getattr(torch.ops.aten, name)

        def spy(*args, _op=op, _name=name, **kwargs):
            seen.append((_name, args))
            return _op(*args, **kwargs)

        monkeypatch.setattr(torch.ops.aten, name, spy)
    call = Call(0, 16, 0, 16, "causal", 0, 0, (3, 4, 11), (3, 4, 11))
    q = torch.empty(2, 16, 4, 64, dtype=torch.bfloat16, device="meta")
    k = torch.empty(2, 16, 2, 64, dtype=torch.bfloat16, device="meta")
    out, lse = TorchCUDA().forward(q, k, k, call, MaskSpec(True, None, 0.125))
    TorchCUDA().backward(torch.empty_like(out), q, k, k, out, lse, call, MaskSpec(True, None, 0.125))
    assert [name for name, _ in seen] == ["_flash_attention_forward", "_flash_attention_backward"]
    args = seen[0][1]
    assert args[0].shape == (32, 4, 64) and args[1].shape == (32, 2, 64)
    assert args[3].dtype == torch.int32 and args[3].shape == (9,) and args[5:7] == (7, 7)  # 8 documents, longest 7
    assert lse.shape == (2, 16, 4) and out.shape == q.shape
