"""patch_model / unpatch_model: switch a transformers causal LM to ring attention, in place.

patch_model refuses what the ring cannot honour (models.py), registers the attention entry
(interface.py), leaves RingSettings on every module (settings.py), and adds two hooks: one
that checks each batch is this rank's part (from shard_batch, batch.py), one that turns each
rank's partial loss into the full-sequence loss.
"""

from __future__ import annotations

import inspect

from ringpatch.attention.comm import SumOverGroup, resolve_group
from ringpatch.attention.kernels import check_backend
from ringpatch.attention.layout import Layout, check_layout
from ringpatch.hf.batch import DOCUMENTS_KEY
from ringpatch.hf.interface import IMPLEMENTATION, register
from ringpatch.hf.models import check_transformers_version, unsupported_features
from ringpatch.hf.settings import RingSettings, check_local_batch


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
    check_local_batch(settings, tokens.shape[1], position_ids, kwargs.get(DOCUMENTS_KEY))
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
    check_backend(backend)
    config = model.config
    if getattr(model, "_ringpatch", None) is not None:
        raise ValueError("this model is already ring-patched; call ringpatch.unpatch_model(model) first")
    problems = unsupported_features(config)
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
    register()
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
