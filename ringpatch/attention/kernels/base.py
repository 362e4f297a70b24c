"""What every local block backend implements, and the helpers they share.

Every backend computes one block call of the ring plan (ringpatch.attention.blocks.Call) and
returns (out, lse): out in the input dtype, lse in float32. Backward takes the *final*
(merged) out and lse of the rows, as in FlashAttention-2's ring decomposition, so the
per-block gradients add up to the exact gradients (docs/design.md, "The backward pass"). Backward
needs nothing else from forward: without dropout the kernels' RNG state is unused, which is
also how PyTorch's own context parallelism reuses them.

A kernel that sets `varlen = True` also takes varlen calls (blocks.Call with q_cuts/k_cuts: the
documents of a block in one call); the ring hands any other kernel one call per document.

Shapes at this interface (the ring's layout):
  q, out, dout, dq  # (B, m, H, D)
  k, v, dk, dv      # (B, n, H_kv, D)
  lse               # (B, m, H) float32
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ringpatch.attention.blocks import Call, segments

INDEX_EDGE = 2**31
"""Elements of one call's query tensor from which a CUDA attention kernel's 32-bit offsets
overflow: flash-attn 2 (and torch's CUDA kernels, its port) compute a call's row x heads x dim
offsets in int, which fail or silently wrap once they pass 2^31 (Liger-Kernel#803 reports flash-attn 2
failing there)."""


@dataclass(frozen=True)
class MaskSpec:
    """What a band call needs to rebuild its mask: the global visibility rule."""

    causal: bool
    window: int | None
    scale: float


class Kernel(Protocol):
    """A local attention backend for one kind of device and dtype."""

    name: str
    tile: int | None
    """Largest side of a masked ("band") tile the planner may hand over; None: the kernel takes
    arbitrary windows natively, so partial pairs are never split."""
    index_edge: int | None
    """Elements of one call's queries from which its offsets overflow (INDEX_EDGE); None: it
    indexes in 64 bits where a tensor needs it (torch's CPU ops)."""

    def check(self, q: torch.Tensor) -> None:
        """Raise ValueError, naming the fix, if this kernel cannot serve tensors like `q`."""

    def forward(self, q, k, v, call: Call, spec: MaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) of queries q against keys k, v under the call's mask."""

    def backward(self, dout, q, k, v, out, lse, call: Call, spec: MaskSpec):
        """(dq, dk, dv) of the call, given the rows' final out and lse."""


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


def bhsd(x: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) <-> (B, H, S, D): the layout the aten kernels take."""
    return x.transpose(1, 2)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, n, H_kv, D) -> (B, n, H_kv*groups, D); the copy lives only inside one kernel call."""
    if groups == 1:
        return x
    b, n, h, d = x.shape
    return x[:, :, :, None, :].expand(b, n, h, groups, d).reshape(b, n, h * groups, d)


def sum_kv(dx: torch.Tensor, groups: int) -> torch.Tensor:
    """The gradient of repeat_kv: (B, n, H_kv*groups, D) -> (B, n, H_kv, D)."""
    if groups == 1:
        return dx
    b, n, h, d = dx.shape
    return dx.view(b, n, h // groups, groups, d).sum(3)


def forward_by_segment(forward, q, k, v, call: Call, spec: MaskSpec):
    """A varlen call's (out, lse) through `forward` (a kernel's, for plain calls), one document at a time."""
    outs, lses = [], []
    for s in segments(call):
        qs, ks = slice(s.q0 - call.q0, s.q1 - call.q0), slice(s.k0 - call.k0, s.k1 - call.k0)
        out, lse = forward(q[:, qs], k[:, ks], v[:, ks], s, spec)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, 1)


def backward_by_segment(backward, dout, q, k, v, out, lse, call: Call, spec: MaskSpec):
    """A varlen call's (dq, dk, dv) through `backward` (a kernel's, for plain calls), one document at a time."""
    grads = []
    for s in segments(call):
        qs, ks = slice(s.q0 - call.q0, s.q1 - call.q0), slice(s.k0 - call.k0, s.k1 - call.k0)
        grads.append(backward(dout[:, qs], q[:, qs], k[:, ks], v[:, ks], out[:, qs], lse[:, qs], s, spec))
    return tuple(torch.cat(parts, 1) for parts in zip(*grads, strict=True))


def cumulative_lengths(cuts: tuple[int, ...], length: int, rows: int, device) -> tuple[torch.Tensor, int]:
    """(int32 cumulative document lengths over `rows` rows of `length` tokens cut at `cuts`, the
    longest document): what varlen kernels take for a (rows * length, heads, dim) packed tensor."""
    bounds = (0, *cuts, length)
    starts = [r * length + b for r in range(rows) for b in bounds[:-1]] + [rows * length]
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    return torch.tensor(starts, dtype=torch.int32, device=device), longest


def varlen_args(q: torch.Tensor, k: torch.Tensor, call: Call) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """What a varlen kernel takes for a varlen call's packed rows, in the order flash-attn and aten's
    flash kernel take it: cumulative lengths of the queries and keys, then their longest documents."""
    (b, m), n = q.shape[:2], k.shape[1]
    cu_q, max_q = cumulative_lengths(call.q_cuts, m, b, q.device)
    cu_k, max_k = cumulative_lengths(call.k_cuts, n, b, q.device)
    return cu_q, cu_k, max_q, max_k


def lse_from_packed(lse: torch.Tensor, rows: int, tokens: int) -> torch.Tensor:
    """A varlen kernel's log-sum-exp, (heads, rows * tokens), in this interface's (B, m, H)."""
    return lse.view(lse.shape[0], rows, tokens).permute(1, 2, 0)


def lse_to_packed(lse: torch.Tensor) -> torch.Tensor:
    """This interface's (B, m, H) log-sum-exp as a varlen kernel's backward takes it: (H, B * m)."""
    b, m, h = lse.shape
    return lse.permute(2, 0, 1).reshape(h, b * m).contiguous()
