"""transformers integration: patch_model / unpatch_model.

The ring is registered through transformers' public AttentionInterface and
AttentionMaskInterface under the name "ringpatch"; no transformers function, class or
other registry entry is touched. Per-model settings (group, layout, backend) live on the
model's modules; per-batch metadata travels in the batch (see ringpatch.batch).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from packaging.version import Version

from ringpatch.attention import ring_attention
from ringpatch.comm import SumOverGroup, resolve_group
from ringpatch.kernels import BACKENDS
from ringpatch.layout import Layout, check_layout, local_positions, num_chunks

IMPLEMENTATION = "ringpatch"
TRANSFORMERS_RANGE = (Version("5.0"), Version("6.0"))  # keep in step with setup.cfg
ALIBI_MODEL_TYPES = ("bloom", "mpt", "baichuan", "falcon")  # falcon only when config.alibi


@dataclass(frozen=True)
class RingSettings:
    group: object
    layout: Layout
    backend: str
    sp_size: int
    sp_rank: int
    previous_implementation: str | None


def check_transformers_version(version: str) -> None:
    low, high = TRANSFORMERS_RANGE
    if not low <= Version(version) < high:
        raise ImportError(
            f"ringpatch supports transformers >={low},<{high}; found {version}. "
            f"Install a supported release: pip install 'transformers>={low},<{high}'"
        )


def _unsupported(config) -> list[str]:
    """Features of `config` that ring attention cannot honour exactly."""
    found = []
    if getattr(config, "is_encoder_decoder", False):
        found.append("encoder-decoder architecture (ring attention patches causal decoders only)")
    if getattr(config, "alibi", False) or (config.model_type in ALIBI_MODEL_TYPES and config.model_type != "falcon"):
        found.append("ALiBi position biases")
    for key in ("attn_logit_softcapping", "attention_logit_softcapping"):
        if getattr(config, key, None):
            found.append(f"attention soft-capping ({key}={getattr(config, key)})")
    dropout = getattr(config, "attention_dropout", 0.0) or 0.0
    if dropout > 0:
        found.append(f"attention dropout (attention_dropout={dropout}); set config.attention_dropout = 0.0")
    return found


def _ring_attention_forward(
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
        raise NotImplementedError(
            f"{model_type}: ring attention cannot honour a custom attention mask of shape "
            f"{tuple(attention_mask.shape)}; pass the batch through ringpatch.shard_batch (right padding is handled "
            "through ignored labels) and no attention_mask"
        )
    if dropout:
        raise NotImplementedError(f"{model_type}: attention dropout {dropout} is not supported by ring attention")
    for feature in ("softcap", "s_aux", "cu_seq_lens_q", "cu_seq_lens_k"):
        if kwargs.get(feature) is not None:
            raise NotImplementedError(f"{model_type}: ring attention cannot honour {feature!r}")
    if getattr(module, "is_causal", True) is False:
        raise NotImplementedError(f"{model_type}: ring attention supports causal self-attention only")
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
    )
    return out, None  # (B, S_local, H, D), no attention weights


def _ring_mask(*args, attention_mask=None, **kwargs):
    """AttentionMaskInterface entry: the ring builds its masks from positions, so no S x S
    mask is ever made. A padding mask with zeros cannot be honoured here."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise NotImplementedError(
            "a padding attention_mask reached the ring-patched model; pass the full batch through "
            "ringpatch.shard_batch, which turns right padding into ignored labels"
        )
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _ring_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, _ring_mask)


def check_local_batch(settings: RingSettings, local: int, position_ids: torch.Tensor) -> None:
    """`local` tokens with `position_ids` must be this rank's part under the model's layout."""
    seq_len = local * settings.sp_size
    ok = seq_len % num_chunks(settings.layout, settings.sp_size) == 0 and position_ids.shape[-1] == local
    if ok:
        expected = local_positions(settings.layout, seq_len, settings.sp_size, settings.sp_rank, position_ids.device)
        ok = torch.equal(position_ids, expected.expand_as(position_ids))
    if not ok:
        raise ValueError(
            f"the batch holds {local} tokens per rank with position_ids {position_ids[0, :4].tolist()}..., which is not "
            f"this rank's part ({settings.layout}, sp_rank {settings.sp_rank} of {settings.sp_size}) of a "
            f"{seq_len}-token sequence; cut the full batch with ringpatch.shard_batch(batch, group, layout)"
        )


def _check_call(model, args, kwargs):
    """Forward pre-hook: the batch must come from shard_batch for this group and layout."""
    settings: RingSettings = model._ringpatch
    if kwargs.get("use_cache"):
        raise NotImplementedError("use_cache=True (KV-cache decoding) is not supported on a ring-patched model")
    kwargs["use_cache"] = False
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    position_ids = kwargs.get("position_ids")
    if tokens is None or position_ids is None:
        raise ValueError(
            "a ring-patched model needs this rank's part of the batch with global position_ids: "
            "call model(**ringpatch.shard_batch(batch, group, layout))"
        )
    check_local_batch(settings, tokens.shape[1], position_ids)
    return args, kwargs


def _full_loss(model, args, kwargs, output):
    """Forward hook: each rank's loss is its tokens' summed loss over the global token count
    (num_items_in_batch from shard_batch); summing over the group gives the full-sequence
    loss on every rank, and the sum's backward makes gradients averaged over the group
    equal the full-sequence gradients."""
    loss = getattr(output, "loss", None)
    if loss is None:
        return output
    if kwargs.get("num_items_in_batch") is None:
        raise ValueError("a ring-patched model computes its loss from shard_batch's num_items_in_batch; pass all of it")
    settings: RingSettings = model._ringpatch
    if settings.sp_size > 1:
        output.loss = SumOverGroup.apply(loss, settings.group)
    return output


def patch_model(model, group=None, layout: Layout = "zigzag", backend: str = "auto"):
    """Switch `model` (a transformers causal LM) to ring attention over `group`, in place.

    Returns the model. Call it with `model(**ringpatch.shard_batch(batch, group, layout))`:
    every rank's `loss` is then the full-sequence loss, and gradients averaged over the
    group's ranks equal the unpatched model's."""
    import transformers

    check_transformers_version(transformers.__version__)
    check_layout(layout)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    config = model.config
    if getattr(model, "_ringpatch", None) is not None:
        raise ValueError("this model is already ring-patched; call ringpatch.unpatch_model(model) first")
    problems = _unsupported(config)
    if problems:
        raise NotImplementedError(
            f"model type {config.model_type!r}: ring attention cannot honour " + "; ".join(problems)
        )
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise NotImplementedError(
            f"model type {config.model_type!r} ({type(model).__name__}) takes no position_ids, so its positions "
            "would restart at 0 on every rank; ring attention needs models that take global position_ids"
        )
    if not model._can_set_attn_implementation():
        raise NotImplementedError(
            f"model type {config.model_type!r} does not dispatch attention through transformers' AttentionInterface, "
            "so ring attention cannot be plugged in"
        )
    group, sp_size, sp_rank = resolve_group(group)
    _register()
    settings = RingSettings(group, layout, backend, sp_size, sp_rank, config._attn_implementation)
    model.set_attn_implementation(IMPLEMENTATION)
    for module in model.modules():
        module._ringpatch = settings
    model._ringpatch_hooks = (
        model.register_forward_pre_hook(_check_call, with_kwargs=True),
        model.register_forward_hook(_full_loss, with_kwargs=True),
    )
    return model


def unpatch_model(model):
    """Restore the attention implementation `model` had before patch_model, in place."""
    settings: RingSettings | None = getattr(model, "_ringpatch", None)
    if settings is None:
        raise ValueError("this model is not ring-patched")
    for hook in model._ringpatch_hooks:
        hook.remove()
    for module in model.modules():
        if hasattr(module, "_ringpatch"):
            del module._ringpatch
    del model._ringpatch_hooks
    model.set_attn_implementation(settings.previous_implementation or "eager")
    return model
