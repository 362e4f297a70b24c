"""PyTorch's fused CUDA attention kernels (flash, memory-efficient) as a ring block backend."""

from __future__ import annotations

import torch

from ringpatch.attention.blocks import Call
from ringpatch.attention.kernels.base import (
    INDEX_EDGE,
    MaskSpec,
    backward_by_segment,
    band_bias,
    bhsd,
    forward_by_segment,
    lse_from_packed,
    lse_to_packed,
    repeat_kv,
    sum_kv,
    varlen_args,
)
from ringpatch.errors import BadValue

aten = torch.ops.aten


def pad8(x: torch.Tensor) -> torch.Tensor:
    """The last dim zero-padded to a multiple of 8, as both fused kernels need (torch pads the
    same way inside scaled_dot_product_attention). Exact: zero columns add nothing to q.k, and
    give zero output columns; the scale is passed explicitly, from the true head_dim."""
    extra = -x.shape[-1] % 8
    return torch.nn.functional.pad(x, (0, extra)) if extra else x


class TorchCUDA:
    """PyTorch's fused CUDA kernels that return lse, as aten ops (called as torch 2.13 declares them;
    not yet run on a GPU): flash (fp16/bf16, sm80+, head_dim <= 256, no mask) for full and causal
    calls, with native GQA; memory-efficient (fp16/bf16/fp32, an additive bias) for band calls,
    float32 and older GPUs, with K/V repeated per call (it takes equal head counts only).
    float64 is refused: neither kernel has it. A varlen call (the documents of a block) is one
    flash call with cumulative lengths (aten._flash_attention_forward/_backward, whose log-sum-exp
    comes as (heads, total)); where flash does not serve, the memory-efficient kernel takes it one
    document at a time."""

    name = "torch"
    tile: int | None = 1024
    index_edge: int | None = INDEX_EDGE
    varlen = True

    def check(self, q: torch.Tensor) -> None:
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise BadValue(
                f"the CUDA kernels take float16, bfloat16 or float32, got {q.dtype}; cast q, k, v (e.g. .to(torch.bfloat16))"
            )
        if q.device.type != "cuda":
            raise BadValue(f"the CUDA kernels serve CUDA tensors, got {q.device}")

    @staticmethod
    def _use_flash(q: torch.Tensor, call: Call) -> bool:
        return (
            call.kind != "band"
            and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] <= 256
            and (q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) >= (8, 0))  # meta: tests
        )

    def forward(self, q, k, v, call: Call, spec: MaskSpec):
        if not call.q_cuts:
            return self.forward_one(q, k, v, call, spec)
        if self._use_flash(q, call):
            return self.forward_varlen(q, k, v, call, spec)
        return forward_by_segment(self.forward_one, q, k, v, call, spec)

    def forward_varlen(self, q, k, v, call: Call, spec: MaskSpec):
        """Every document of a varlen call in one flash call."""
        b, m, h, d = q.shape
        qv, kv, vv = (pad8(x).reshape(b * x.shape[1], x.shape[2], -1) for x in (q, k, v))
        out, lse, *_ = aten._flash_attention_forward(
            qv, kv, vv, *varlen_args(q, k, call), 0.0, call.kind == "causal", False, scale=spec.scale
        )
        return out.view(b, m, h, -1)[..., :d], lse_from_packed(lse, b, m)

    def forward_one(self, q, k, v, call: Call, spec: MaskSpec):
        """A plain call: one kernel launch."""
        d, causal = q.shape[-1], call.kind == "causal"
        if self._use_flash(q, call):  # native GQA: K/V as they are
            qt, kt, vt = (bhsd(pad8(x)) for x in (q, k, v))
            out, lse, *_ = aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False, scale=spec.scale)
            return bhsd(out)[..., :d], bhsd(lse)
        groups = q.shape[2] // k.shape[2]
        qt, kt, vt = (bhsd(pad8(x)) for x in (q, repeat_kv(k, groups), repeat_kv(v, groups)))
        bias = self._bias(q, k, call, spec)
        out, lse, *_ = aten._scaled_dot_product_efficient_attention(
            qt, kt, vt, bias, True, 0.0, causal, scale=spec.scale
        )
        return bhsd(out)[..., :d], bhsd(lse[:, :, : q.shape[1]])

    @staticmethod
    def _bias(q, k, call: Call, spec: MaskSpec):
        if call.kind != "band":
            return None
        b, m, h, _ = q.shape
        # the kernel wants the bias' last dim 16-aligned in memory
        return band_bias(call, spec, m, k.shape[1], q.dtype, q.device, pad_to=16).expand(b, h, m, k.shape[1])

    def backward(self, dout, q, k, v, out, lse, call: Call, spec: MaskSpec):
        if not call.q_cuts:
            return self.backward_one(dout, q, k, v, out, lse, call, spec)
        if self._use_flash(q, call):
            return self.backward_varlen(dout, q, k, v, out, lse, call, spec)
        return backward_by_segment(self.backward_one, dout, q, k, v, out, lse, call, spec)

    def backward_varlen(self, dout, q, k, v, out, lse, call: Call, spec: MaskSpec):
        """Every document of a varlen call in one flash backward call."""
        (b, m, h, d), (n, h_kv) = q.shape, k.shape[1:3]
        dout_v, qv, kv, vv, out_v = (pad8(x).reshape(b * x.shape[1], x.shape[2], -1) for x in (dout, q, k, v, out))
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        offset = torch.zeros((), dtype=torch.uint64, device=q.device)
        dq, dk, dv = aten._flash_attention_backward(
            dout_v, qv, kv, vv, out_v, lse_to_packed(lse), *varlen_args(q, k, call), 0.0, call.kind == "causal", seed,
            offset,
            scale=spec.scale,
        )  # fmt: skip
        return dq.view(b, m, h, -1)[..., :d], dk.view(b, n, h_kv, -1)[..., :d], dv.view(b, n, h_kv, -1)[..., :d]

    def backward_one(self, dout, q, k, v, out, lse, call: Call, spec: MaskSpec):
        """A plain call's backward: one kernel launch."""
        d, causal = q.shape[-1], call.kind == "causal"
        lse_t = bhsd(lse).contiguous()
        m, n = q.shape[1], k.shape[1]
        if self._use_flash(q, call):
            # dense call, no dropout: no cumulative lengths, RNG state unused (forward's are None/ignored)
            seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
            offset = torch.zeros((), dtype=torch.uint64, device=q.device)
            dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
                *(bhsd(pad8(x)) for x in (dout, q, k, v, out)),
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
            return tuple(bhsd(x)[..., :d] for x in (dq, dk, dv))  # dK/dV come summed over each group
        groups = q.shape[2] // k.shape[2]
        seed = offset = torch.zeros((), dtype=torch.long, device=q.device)
        lse_pad = lse_t.new_zeros(*lse_t.shape[:2], -(-m // 32) * 32)  # the kernel's lse is 32-padded
        lse_pad[:, :, :m] = lse_t
        dout_t, qt, kt, vt, out_t = (bhsd(pad8(x)) for x in (dout, q, repeat_kv(k, groups), repeat_kv(v, groups), out))
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout_t,
            qt,
            kt,
            vt,
            self._bias(q, k, call, spec),
            out_t,
            lse_pad,
            seed,
            offset,
            0.0,
            [True, True, True, False],
            causal,
            scale=spec.scale,
        )
        return bhsd(dq)[..., :d], sum_kv(bhsd(dk)[..., :d], groups), sum_kv(bhsd(dv)[..., :d], groups)
