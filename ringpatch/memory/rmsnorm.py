"""Chunked RMSNorm: recipe `rmsnorm: chunked` (default `stock`).

A transformers RMSNorm (Llama, Mistral, Qwen) computes in float32 and autograd keeps its
intermediates: a float32 copy of the input (in bf16 training), the normalized input, and in its
backward five float32 (tokens x hidden) temporaries at once. At 131,072 tokens a GPU and hidden
4096 that is 2 GiB each: the largest part of a decoder layer's backward (ringpatch plan names it
"layer backward (norm)"). Chunked, the norm saves only its input and one float32 1/rms per token
and recomputes the rest in its backward, RMS_CHUNK_BYTES of float32 at a time (as Liger's and
ALST's fused RMSNorm keep X and 1/rms). Cost: the normalization is computed once more in backward
(a few elementwise passes over the input per norm; nothing next to attention at long context).

Exact: the forward is the stock arithmetic, row by row (the same outputs); the backward is its
derivative, dx = (w g - xhat mean(w g xhat)) / rms, accumulated in float32 (rounding differences
only), and the weight's gradient is summed in float32 over the rows.
"""

from __future__ import annotations

import types

import torch

from ringpatch.errors import BadValue

RMS_CHUNK_BYTES = 256 * 2**20
"""The most bytes of one float32 temporary of a chunk: tokens per chunk = this / (4 x hidden)."""


def _rows(hidden: int) -> int:
    return max(1, RMS_CHUNK_BYTES // (4 * hidden))


class ChunkedRMSNorm(torch.autograd.Function):
    """y = w * (x / rms(x)).to(x.dtype), rms in float32; saves x and 1/rms. # x (..., hidden)"""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        flat = x.reshape(-1, x.shape[-1])  # (N, hidden)
        out = flat.new_empty(flat.shape, dtype=torch.promote_types(weight.dtype, x.dtype))
        rstd = flat.new_empty((flat.shape[0], 1), dtype=torch.float32)
        step = _rows(flat.shape[-1])
        for i in range(0, flat.shape[0], step):
            part = flat[i : i + step].to(torch.float32)
            r = torch.rsqrt(part.pow(2).mean(-1, keepdim=True) + eps)
            rstd[i : i + step] = r
            out[i : i + step] = weight * (part * r).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        flat, g = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        dx = torch.empty_like(flat)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        step = _rows(flat.shape[-1])
        for i in range(0, flat.shape[0], step):
            r = rstd[i : i + step]
            xhat = flat[i : i + step].to(torch.float32) * r
            g_part = g[i : i + step]
            dw += (g_part.to(torch.float32) * xhat.to(x.dtype).to(torch.float32)).sum(0)
            gx = (g_part * weight).to(torch.float32)  # the gradient of the normalized input
            dx[i : i + step] = r * (gx - xhat * (gx * xhat).mean(-1, keepdim=True))
        return dx.view_as(x), dw.to(weight.dtype), None


def is_rmsnorm(module: torch.nn.Module) -> bool:
    """A transformers RMSNorm: a weight over the last dimension and variance_epsilon."""
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def chunk_rmsnorms(lm: torch.nn.Module) -> int:
    """Run every RMSNorm of `lm` through ChunkedRMSNorm; the number of norms."""
    norms = [m for m in lm.modules() if is_rmsnorm(m)]
    if not norms:
        raise BadValue(f"rmsnorm: chunked, but {type(lm).__name__} has no RMSNorm modules; set rmsnorm: stock")
    for norm in norms:

        def forward(self, hidden_states):
            return ChunkedRMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)

        norm.forward = types.MethodType(forward, norm)
    return len(norms)
