"""Local block attention backends.

Every backend computes one block call of the ring plan (ringpatch.plan.Call) and returns
(out, lse): out in the input dtype, lse in float32. Backward takes the *final* (merged) out
and lse of the rows, as in FlashAttention-2's ring decomposition, so the per-block gradients
add up to the exact gradients. Backward needs nothing else from forward: without dropout the
kernels' RNG state is unused, which is also how PyTorch's own context parallelism reuses them.

Shapes at this interface (the ring's layout):
  q, out, dout, dq  # (B, m, H, D)
  k, v, dk, dv      # (B, n, H_kv, D)
  lse               # (B, m, H) float32
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from ringpatch.plan import Call

Backend = Literal["auto", "torch", "flash_attn"]
BACKENDS: tuple[str, ...] = get_args(Backend)
aten = torch.ops.aten


@dataclass(frozen=True)
class MaskSpec:
    """What a band call needs to rebuild its mask: the global visibility rule."""

    causal: bool
    window: int | None
    scale: float


def band_bias(call: Call, spec: MaskSpec, m: int, n: int, dtype, device, pad_to: int = 1) -> torch.Tensor:
    """Additive mask (0 / -inf) for a band call. # (m, n), last dim padded to `pad_to`"""
    i = torch.arange(call.q_pos, call.q_pos + m, device=device)[:, None]
    j = torch.arange(call.k_pos, call.k_pos + n, device=device)[None, :]
    visible = torch.ones(m, n, dtype=torch.bool, device=device)
    if spec.causal:
        visible &= j <= i
    if spec.window is not None:
        visible &= j > i - spec.window
    n_pad = -(-n // pad_to) * pad_to
    bias = torch.full((m, n_pad), float("-inf"), dtype=dtype, device=device)
    bias[:, :n].masked_fill_(visible, 0.0)
    return bias[:, :n]


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, n, H_kv, D) -> (B, n, H_kv*groups, D); the copy lives only inside one kernel call."""
    if groups == 1:
        return x
    b, n, h, d = x.shape
    return x[:, :, :, None, :].expand(b, n, h, groups, d).reshape(b, n, h * groups, d)


def _sum_kv(dx: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return dx
    b, n, h, d = dx.shape
    return dx.view(b, n, h // groups, groups, d).sum(3)


class TorchCPU:
    """PyTorch's CPU flash-attention kernel: returns lse, has a backward, native GQA.

    Half-precision blocks are computed in float32: the CPU kernel is no faster in bfloat16
    here, and a float32 block result avoids rounding each partial output before the merge,
    so the ring's error stays that of one final rounding, like monolithic attention."""

    name = "torch"
    tile: int | None = 512  # band masks cost full tiles here, so split partial pairs

    def check(self, q: torch.Tensor) -> None:
        if q.device.type != "cpu":
            raise ValueError(f"the CPU kernel serves CPU tensors, got {q.device}")

    @staticmethod
    def _args(q, k, v, call: Call, spec: MaskSpec):
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        mask = None
        if call.kind == "band":
            mask = band_bias(call, spec, q.shape[1], k.shape[1], dtype, q.device)
        qkv = [_bhsd(x.to(dtype)) for x in (q, k, v)]
        return qkv, dict(attn_mask=mask, scale=spec.scale), dtype

    def forward(self, q, k, v, call: Call, spec: MaskSpec):
        (qt, kt, vt), kw, _ = self._args(q, k, v, call, spec)
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, call.kind == "causal", **kw)
        return _bhsd(out), _bhsd(lse)

    def backward(self, dout, q, k, v, out, lse, call: Call, spec: MaskSpec):
        (qt, kt, vt), kw, dtype = self._args(q, k, v, call, spec)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _bhsd(dout.to(dtype)), qt, kt, vt, _bhsd(out.to(dtype)), _bhsd(lse.to(dtype)),
            0.0, call.kind == "causal", **kw,
        )  # fmt: skip
        return _bhsd(dq), _bhsd(dk), _bhsd(dv)


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
        qt, kt, vt = _bhsd(q), _bhsd(_repeat_kv(k, groups)), _bhsd(_repeat_kv(v, groups))
        causal = call.kind == "causal"
        if self._use_flash(q, call):
            out, lse, *_ = aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False, scale=spec.scale)
            return _bhsd(out), _bhsd(lse)
        bias = self._bias(q, k, call, spec)
        out, lse, *_ = aten._scaled_dot_product_efficient_attention(
            qt, kt, vt, bias, True, 0.0, causal, scale=spec.scale
        )
        return _bhsd(out), _bhsd(lse[:, :, : q.shape[1]])

    @staticmethod
    def _bias(q, k, call: Call, spec: MaskSpec):
        if call.kind != "band":
            return None
        b, m, h, _ = q.shape
        # the kernel wants the bias' last dim 16-aligned in memory
        return band_bias(call, spec, m, k.shape[1], q.dtype, q.device, pad_to=16).expand(b, h, m, k.shape[1])

    def backward(self, dout, q, k, v, out, lse, call: Call, spec: MaskSpec):
        groups = q.shape[2] // k.shape[2]
        qt, kt, vt = _bhsd(q), _bhsd(_repeat_kv(k, groups)), _bhsd(_repeat_kv(v, groups))
        causal = call.kind == "causal"
        lse_t = _bhsd(lse).contiguous()
        m, n = q.shape[1], k.shape[1]
        if self._use_flash(q, call):
            # dense call, no dropout: no cumulative lengths, RNG state unused (forward's are None/ignored)
            seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
            offset = torch.zeros((), dtype=torch.uint64, device=q.device)
            dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
                _bhsd(dout), qt, kt, vt, _bhsd(out), lse_t, None, None, m, n, 0.0, causal, seed, offset,
                scale=spec.scale,
            )  # fmt: skip
        else:
            seed = offset = torch.zeros((), dtype=torch.long, device=q.device)
            lse_pad = lse_t.new_zeros(*lse_t.shape[:2], -(-m // 32) * 32)  # the kernel's lse is 32-padded
            lse_pad[:, :, :m] = lse_t
            dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
                _bhsd(dout), qt, kt, vt, self._bias(q, k, call, spec), _bhsd(out), lse_pad, seed, offset,
                0.0, [True, True, True, False], causal, scale=spec.scale,
            )  # fmt: skip
        return _bhsd(dq), _sum_kv(_bhsd(dk), groups), _sum_kv(_bhsd(dv), groups)


class FlashAttn:
    """Dao-AILab flash-attn 2: native GQA and native sliding windows (no tiling needed)."""

    name = "flash_attn"
    tile: int | None = None

    def check(self, q: torch.Tensor) -> None:
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("backend 'flash_attn' needs the flash-attn package: pip install 'ringpatch[gpu]'")
        if q.device.type != "cuda":
            raise ValueError(f"backend 'flash_attn' needs CUDA tensors, got {q.device}; use backend='auto'")
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"backend 'flash_attn' supports float16/bfloat16, got {q.dtype}; use backend='torch' or 'auto'"
            )
        if q.shape[-1] > 256 or q.shape[-1] % 8:
            raise ValueError(
                f"backend 'flash_attn' supports head_dim <= 256 and divisible by 8, got {q.shape[-1]}; "
                "use backend='torch'"
            )

    @staticmethod
    def _window(call: Call, spec: MaskSpec, m: int, n: int) -> tuple[bool, int, int]:
        if call.kind != "band":
            return call.kind == "causal", -1, -1
        # flash-attn aligns query row i with key row i + n - m (bottom-right); shift our
        # global rule  q_pos+i-W < k_pos+j <= q_pos+i  into that frame.
        d = call.q_pos - call.k_pos - (n - m)
        left = -1 if spec.window is None else spec.window - 1 - d
        right = d if spec.causal else -1
        assert (spec.window is None or left >= 0) and (not spec.causal or right >= 0), (call, left, right)
        return False, left, right

    def forward(self, q, k, v, call: Call, spec: MaskSpec):
        from flash_attn.flash_attn_interface import _flash_attn_forward

        causal, left, right = self._window(call, spec, q.shape[1], k.shape[1])
        out, lse, _, _ = _flash_attn_forward(
            q, k, v, dropout_p=0.0, softmax_scale=spec.scale, causal=causal,
            window_size_left=left, window_size_right=right, softcap=0.0, alibi_slopes=None, return_softmax=False,
        )  # fmt: skip
        return out, _bhsd(lse)

    def backward(self, dout, q, k, v, out, lse, call: Call, spec: MaskSpec):
        from flash_attn.flash_attn_interface import _flash_attn_backward

        causal, left, right = self._window(call, spec, q.shape[1], k.shape[1])
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_backward(
            dout.contiguous(), q, k, v, out.contiguous(), _bhsd(lse).contiguous(), dq, dk, dv,
            dropout_p=0.0, softmax_scale=spec.scale, causal=causal, window_size_left=left,
            window_size_right=right, softcap=0.0, alibi_slopes=None, deterministic=False,
        )  # fmt: skip
        return dq, dk, dv


def select(backend: str, q: torch.Tensor):
    """Resolve `backend` for tensors like `q`; raises if it cannot serve them."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if q.device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
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
        raise ValueError(f"backend 'torch' has no kernel for device {q.device}; ringpatch runs on CPU and CUDA")
    kernel.check(q)
    return kernel


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
