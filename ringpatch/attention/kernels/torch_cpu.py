"""PyTorch's fused CPU attention kernel as a ring block backend."""

from __future__ import annotations

import torch

from ringpatch.attention.blocks import Call
from ringpatch.attention.kernels.base import MaskSpec, band_bias, bhsd
from ringpatch.errors import BadValue

aten = torch.ops.aten


class TorchCPU:
    """PyTorch's CPU flash-attention kernel: returns lse, has a backward, native GQA.

    Half-precision blocks are computed in float32: the CPU kernel is no faster in bfloat16
    here, and a float32 block result avoids rounding each partial output before the merge,
    so the ring's error stays that of one final rounding, like monolithic attention."""

    name = "torch"
    tile: int | None = 512  # band masks cost full tiles here, so split partial pairs
    index_edge: int | None = None

    def check(self, q: torch.Tensor) -> None:
        if q.device.type != "cpu":
            raise BadValue(f"the CPU kernel serves CPU tensors, got {q.device}")

    @staticmethod
    def _args(q, k, v, call: Call, spec: MaskSpec):
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        mask = None
        if call.kind == "band":
            mask = band_bias(call, spec, q.shape[1], k.shape[1], dtype, q.device)
        qkv = [bhsd(x.to(dtype)) for x in (q, k, v)]
        return qkv, dict(attn_mask=mask, scale=spec.scale), dtype

    def forward(self, q, k, v, call: Call, spec: MaskSpec):
        (qt, kt, vt), kw, _ = self._args(q, k, v, call, spec)
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, call.kind == "causal", **kw)
        return bhsd(out), bhsd(lse)

    def backward(self, dout, q, k, v, out, lse, call: Call, spec: MaskSpec):
        (qt, kt, vt), kw, dtype = self._args(q, k, v, call, spec)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            bhsd(dout.to(dtype)),
            qt,
            kt,
            vt,
            bhsd(out.to(dtype)),
            bhsd(lse.to(dtype)),
            0.0,
            call.kind == "causal",
            **kw,
        )
        return bhsd(dq), bhsd(dk), bhsd(dv)
