"""PyTorch's fused CUDA attention kernels (flash, memory-efficient) as a ring block backend."""

from __future__ import annotations

import torch

from ringpatch.attention.blocks import Call
from ringpatch.attention.kernels.base import MaskSpec, band_bias, bhsd, repeat_kv, sum_kv

aten = torch.ops.aten


class TorchCUDA:
    """PyTorch's fused CUDA kernels that return lse: flash (fp16/bf16, no mask) for full and
    causal calls, memory-efficient (any float dtype, additive bias) for band calls and float32.
    Neither takes unequal head counts at the aten level, so K/V are repeated per call."""

    name = "torch"
    tile: int | None = 1024

    def check(self, q: torch.Tensor) -> None:
        if q.device.type != "cuda":
            raise ValueError(f"the CUDA kernels serve CUDA tensors, got {q.device}")

    @staticmethod
    def _use_flash(q: torch.Tensor, call: Call) -> bool:
        return call.kind != "band" and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256

    def forward(self, q, k, v, call: Call, spec: MaskSpec):
        groups = q.shape[2] // k.shape[2]
        qt, kt, vt = bhsd(q), bhsd(repeat_kv(k, groups)), bhsd(repeat_kv(v, groups))
        causal = call.kind == "causal"
        if self._use_flash(q, call):
            out, lse, *_ = aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False, scale=spec.scale)
            return bhsd(out), bhsd(lse)
        bias = self._bias(q, k, call, spec)
        out, lse, *_ = aten._scaled_dot_product_efficient_attention(
            qt, kt, vt, bias, True, 0.0, causal, scale=spec.scale
        )
        return bhsd(out), bhsd(lse[:, :, : q.shape[1]])

    @staticmethod
    def _bias(q, k, call: Call, spec: MaskSpec):
        if call.kind != "band":
            return None
        b, m, h, _ = q.shape
        # the kernel wants the bias' last dim 16-aligned in memory
        return band_bias(call, spec, m, k.shape[1], q.dtype, q.device, pad_to=16).expand(b, h, m, k.shape[1])

    def backward(self, dout, q, k, v, out, lse, call: Call, spec: MaskSpec):
        groups = q.shape[2] // k.shape[2]
        qt, kt, vt = bhsd(q), bhsd(repeat_kv(k, groups)), bhsd(repeat_kv(v, groups))
        causal = call.kind == "causal"
        lse_t = bhsd(lse).contiguous()
        m, n = q.shape[1], k.shape[1]
        if self._use_flash(q, call):
            # dense call, no dropout: no cumulative lengths, RNG state unused (forward's are None/ignored)
            seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
            offset = torch.zeros((), dtype=torch.uint64, device=q.device)
            dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
                bhsd(dout),
                qt,
                kt,
                vt,
                bhsd(out),
                lse_t,
                None,
                None,
                m,
                n,
                0.0,
                causal,
                seed,
                offset,
                scale=spec.scale,
            )
        else:
            seed = offset = torch.zeros((), dtype=torch.long, device=q.device)
            lse_pad = lse_t.new_zeros(*lse_t.shape[:2], -(-m // 32) * 32)  # the kernel's lse is 32-padded
            lse_pad[:, :, :m] = lse_t
            dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
                bhsd(dout),
                qt,
                kt,
                vt,
                self._bias(q, k, call, spec),
                bhsd(out),
                lse_pad,
                seed,
                offset,
                0.0,
                [True, True, True, False],
                causal,
                scale=spec.scale,
            )
        return bhsd(dq), sum_kv(bhsd(dk), groups), sum_kv(bhsd(dv), groups)
