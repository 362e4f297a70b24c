"""flash-attn 2 (Dao-AILab) as a ring block backend: CUDA, float16/bfloat16, native GQA and windows;
the documents of a varlen call in one call of its varlen kernels."""

from __future__ import annotations

import functools

import torch

from ringpatch.attention.blocks import Call
from ringpatch.attention.kernels.base import INDEX_EDGE, MaskSpec, bhsd, lse_from_packed, lse_to_packed, varlen_args
from ringpatch.errors import BadValue

MIN_VERSION = (2, 7)  # window_size_left/right and softcap as keywords of _flash_attn_(varlen_)forward/_backward


@functools.cache
def unavailable() -> str | None:
    """Why flash-attn cannot serve (None: it can). Imports the kernels for real: a package that is
    installed but built against another torch or CUDA fails here, once, not inside the ring."""
    try:
        import flash_attn
        from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward  # noqa: F401
    except ImportError as e:
        if e.name == "flash_attn":
            return "the flash-attn package is not installed: pip install 'ringpatch[gpu]' (see README, GPU extra)"
        return f"flash-attn is installed but does not load ({type(e).__name__}: {e}); rebuild it for this torch/CUDA"
    except Exception as e:  # a broken build can raise OSError or RuntimeError from its extension
        return f"flash-attn is installed but does not load ({type(e).__name__}: {e}); rebuild it for this torch/CUDA"
    version = tuple(int(x) for x in flash_attn.__version__.split(".")[:2] if x.isdigit())
    if version < MIN_VERSION:
        return f"flash-attn {flash_attn.__version__} is older than {'.'.join(map(str, MIN_VERSION))}; upgrade it"
    return None


class FlashAttn:
    """Dao-AILab flash-attn 2: native GQA and native sliding windows (no tiling needed). A varlen
    call (the documents of a block; only full and causal calls are packed) is one call of
    _flash_attn_varlen_forward/_backward over the rows' tokens packed as (rows * tokens, heads,
    dim), with int32 cumulative lengths; its log-sum-exp comes as (heads, total)."""

    name = "flash_attn"
    tile: int | None = None
    index_edge: int | None = INDEX_EDGE
    varlen = True

    def check(self, q: torch.Tensor) -> None:
        reason = unavailable()
        if reason is not None:
            raise BadValue(f"backend 'flash_attn': {reason}; or use backend='torch'")
        if q.device.type != "cuda":
            raise BadValue(f"backend 'flash_attn' needs CUDA tensors, got {q.device}; use backend='auto'")
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise BadValue(
                f"backend 'flash_attn' supports float16/bfloat16, got {q.dtype}; use backend='torch' or 'auto'"
            )
        if q.shape[-1] > 256 or q.shape[-1] % 8:
            raise BadValue(
                f"backend 'flash_attn' supports head_dim <= 256 and divisible by 8, got {q.shape[-1]}; "
                "use backend='torch'"
            )
        capability = torch.cuda.get_device_capability(q.device)
        if capability < (8, 0):
            raise BadValue(
                f"backend 'flash_attn' needs an Ampere or newer GPU (sm80+), got sm{capability[0]}{capability[1]} "
                f"({torch.cuda.get_device_name(q.device)}); use backend='torch'"
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

    def _options(self, q, k, call: Call, spec: MaskSpec) -> dict:
        """The keyword arguments forward and backward share: the mask, the scale, no dropout."""
        causal, left, right = self._window(call, spec, q.shape[1], k.shape[1])
        return {"dropout_p": 0.0, "softmax_scale": spec.scale, "causal": causal, "window_size_left": left,
                "window_size_right": right, "softcap": 0.0, "alibi_slopes": None}  # fmt: skip

    def forward(self, q, k, v, call: Call, spec: MaskSpec):
        if call.q_cuts:
            return self._forward_varlen(q, k, v, call, spec)
        from flash_attn.flash_attn_interface import _flash_attn_forward

        out, lse, _, _ = _flash_attn_forward(q, k, v, return_softmax=False, **self._options(q, k, call, spec))
        return out, bhsd(lse)

    def _forward_varlen(self, q, k, v, call: Call, spec: MaskSpec):
        from flash_attn.flash_attn_interface import _flash_attn_varlen_forward

        b, m, h, d = q.shape
        packed = (x.reshape(b * x.shape[1], *x.shape[2:]) for x in (q, k, v))
        out, lse, _, _ = _flash_attn_varlen_forward(
            *packed, *varlen_args(q, k, call), return_softmax=False, **self._options(q, k, call, spec)
        )
        return out.view(b, m, h, d), lse_from_packed(lse, b, m)

    def backward(self, dout, q, k, v, out, lse, call: Call, spec: MaskSpec):
        deterministic = torch.are_deterministic_algorithms_enabled()
        if call.q_cuts:
            return self._backward_varlen(dout, q, k, v, out, lse, call, spec, deterministic)
        from flash_attn.flash_attn_interface import _flash_attn_backward

        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_backward(
            dout.contiguous(),
            q,
            k,
            v,
            out.contiguous(),
            bhsd(lse).contiguous(),
            dq,
            dk,
            dv,
            deterministic=deterministic,
            **self._options(q, k, call, spec),
        )
        return dq, dk, dv

    def _backward_varlen(self, dout, q, k, v, out, lse, call: Call, spec: MaskSpec, deterministic: bool):
        from flash_attn.flash_attn_interface import _flash_attn_varlen_backward

        (b, m, h, d), (n, h_kv) = q.shape, k.shape[1:3]
        dout_v, q_v, out_v = (x.reshape(b * m, h, d) for x in (dout, q, out))
        k_v, v_v = (x.reshape(b * n, h_kv, d) for x in (k, v))
        dq, dk, dv = q_v.new_empty(b * m, h, d), k_v.new_empty(b * n, h_kv, d), k_v.new_empty(b * n, h_kv, d)
        _flash_attn_varlen_backward(
            dout_v, q_v, k_v, v_v, out_v, lse_to_packed(lse), dq, dk, dv, *varlen_args(q, k, call),
            deterministic=deterministic, **self._options(q, k, call, spec),
        )  # fmt: skip
        return dq.view(b, m, h, d), dk.view(b, n, h_kv, d), dv.view(b, n, h_kv, d)
