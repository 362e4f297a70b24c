"""The ring as transformers sees it: entries in its public AttentionInterface and
AttentionMaskInterface, registered under our own name, "ringpatch".

No transformers function, class or other registry entry is touched. The attention entry reads
the settings patch_model left on the module; the mask entry makes sure no S x S mask is built
(the ring builds its masks from positions).
"""

from __future__ import annotations

import torch

from ringpatch.attention import ring_attention
from ringpatch.attention.ring import KeptAttention
from ringpatch.errors import BadValue, Unsupported
from ringpatch.hf.batch import AGREED_KEY, DOCUMENTS_KEY
from ringpatch.hf.settings import RingSettings

IMPLEMENTATION = "ringpatch"


def ring_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs
):
    """AttentionInterface entry. query (B, H, S_local, D); key/value (B, H_kv, S_local, D)."""
    settings: RingSettings | None = getattr(module, "_ringpatch", None)
    model_type = getattr(getattr(module, "config", None), "model_type", "this model")
    if settings is None:
        raise RuntimeError(
            f"attention implementation {IMPLEMENTATION!r} was selected on a module that ringpatch.patch_model "
            "did not patch; call ringpatch.patch_model(model) instead of setting attn_implementation by hand"
        )
    if isinstance(attention_mask, torch.Tensor):
        raise Unsupported(
            f"{model_type}: ring attention cannot honour a custom attention mask of shape "
            f"{tuple(attention_mask.shape)}; pass the batch through ringpatch.shard_batch (right padding is handled "
            "through ignored labels) and no attention_mask"
        )
    if dropout:
        raise Unsupported(f"{model_type}: attention dropout {dropout} is not supported by ring attention")
    for feature in ("softcap", "s_aux"):
        if kwargs.get(feature) is not None:
            raise Unsupported(f"{model_type}: ring attention cannot honour {feature!r}")
    for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if kwargs.get(name) is not None:
            raise BadValue(
                f"{name} reached a ring-patched model: pass the packed batch through ringpatch.shard_batch, which "
                "turns it into document masking over the ring"
            )
    if getattr(module, "is_causal", True) is False:
        raise Unsupported(f"{model_type}: ring attention supports causal self-attention only")
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):  # as transformers' flash-attention path: one dtype, autocast's
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = (x.to(dtype) for x in (query, key, value))
    out = ring_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        group=settings.group,
        causal=True,
        window=sliding_window or None,
        scale=scaling,
        layout=settings.layout,
        backend=settings.backend,
        cu_seqlens=kwargs.get(DOCUMENTS_KEY),
        keep=_kept(module) if settings.keep_attention else None,
        agreed=kwargs.get(AGREED_KEY, False),
    )
    return out, None  # (B, S_local, H, D), no attention weights


def _kept(module) -> KeptAttention:
    """The attention module's slot for its output between forward and the checkpoint's recompute."""
    kept = module.__dict__.get("_ringpatch_kept")
    if kept is None:
        kept = module._ringpatch_kept = KeptAttention()
    return kept


def ring_mask(*args, attention_mask=None, **kwargs):
    """AttentionMaskInterface entry: the ring builds its masks from positions, so no S x S
    mask is ever made. A padding mask with zeros cannot be honoured here."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise Unsupported(
            "a padding attention_mask reached the ring-patched model; pass the full batch through "
            "ringpatch.shard_batch, which turns right padding into ignored labels"
        )
    return None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, ring_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, ring_mask)
