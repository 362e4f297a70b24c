"""patch_model / unpatch_model: switch a transformers causal LM to ring attention, in place.

patch_model refuses what the ring cannot honour (models.py), registers the attention entry
(interface.py), leaves RingSettings on every module (settings.py), and adds two hooks: one
that checks each batch is this rank's part (from shard_batch, batch.py), one that turns each
rank's partial loss into the full-sequence loss.
"""

from __future__ import annotations

import inspect
import os

import torch
import torch.distributed as dist

from ringpatch.attention.comm import SumOverGroup, resolve_group
from ringpatch.attention.kernels import check_backend
from ringpatch.attention.layout import DEFAULT_LAYOUT, Layout, check_layout
from ringpatch.attention.ulysses import UlyssesRing, check_heads
from ringpatch.errors import BadValue, Unsupported
from ringpatch.hf.architecture import check_architecture, head_counts
from ringpatch.hf.batch import AGREED_KEY, DOCUMENTS_KEY
from ringpatch.hf.interface import IMPLEMENTATION, register
from ringpatch.hf.models import check_transformers_version
from ringpatch.hf.settings import RingSettings, check_local_batch
from ringpatch.parallel import launch_int


def _check_call(model, args, kwargs):
    """Forward pre-hook: the batch must come from shard_batch for this group and layout."""
    settings: RingSettings = model._ringpatch
    if kwargs.get("use_cache"):
        raise Unsupported(
            "use_cache=True (KV-cache decoding, what generate() does) is not supported on a ring-patched model: "
            "generate with the model unpatched (ringpatch.unpatch_model(model), or load its exported folder), or "
            "score long prompts with a ring prefill (ringpatch eval; ringpatch.evaluate.prefill)"
        )
    kwargs["use_cache"] = False
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    position_ids = kwargs.get("position_ids")
    if tokens is None or position_ids is None:
        raise BadValue(
            "a ring-patched model needs this rank's part of the batch with global position_ids: "
            "call model(**ringpatch.shard_batch(batch, group, layout)); under transformers.Trainer or TRL use "
            "ringpatch.integrations.RingTrainer / RingSFTTrainer, which cut each batch for you"
        )
    bounds = check_local_batch(settings, tokens.shape[1], position_ids, kwargs.get(DOCUMENTS_KEY))
    if bounds is not None:
        kwargs[DOCUMENTS_KEY] = bounds  # read from the device once, here, not by every layer
    kwargs[AGREED_KEY] = True
    if settings.keep_attention and model.training and torch.is_grad_enabled() and not _checkpointed(model):
        raise BadValue(
            "patch_model(keep_attention=True) keeps attention outputs for the recompute of activation-checkpointed "
            "layers, but this model has no activation checkpointing, so they would be kept for nothing: call "
            "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}), or patch "
            "without keep_attention"
        )
    return args, kwargs


def _checkpointed(model) -> bool:
    """Whether activation checkpointing is on (transformers >= 5.x renamed the property)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def _full_loss(model, args, kwargs, output):
    """Forward hook: each rank's loss is its tokens' summed loss over the global token count
    (num_items_in_batch from shard_batch); summing over the group gives the full-sequence
    loss on every rank, and the sum's backward makes gradients averaged over the group
    equal the full-sequence gradients.

    A training call without labels on a ring of more than one rank raises: its logits are this
    rank's part of the sequence, and a loss a trainer computes from them (Trainer's
    label-smoothing path, TRL's compute_loss) would be a fraction of the tokens, never summed over
    the ring: a silently wrong loss and gradients. patch_model(local_logits=True) allows it for
    a loss summed over the group by the caller."""
    loss = getattr(output, "loss", None)
    settings: RingSettings = model._ringpatch
    if loss is None:
        if settings.sp_size > 1 and model.training and torch.is_grad_enabled() and not settings.local_logits:
            raise BadValue(
                "a ring-patched model was called for training without labels: its logits cover only this rank's "
                f"{kwargs['position_ids'].shape[-1]} of {kwargs['position_ids'].shape[-1] * settings.sp_size} tokens, "
                "so a loss computed from them misses the other ranks' tokens. Pass shard_batch's labels and use "
                "output.loss (or ringpatch.causal_lm_loss); for a loss you sum over the group yourself, "
                "patch_model(..., local_logits=True)"
            )
        return output
    if kwargs.get("num_items_in_batch") is None:
        raise BadValue("a ring-patched model computes its loss from shard_batch's num_items_in_batch; pass all of it")
    if settings.sp_size > 1:
        output.loss = SumOverGroup.apply(loss, settings.group)
    return output


def _check_ulysses_heads(config, ulysses: int) -> None:
    """The Ulysses all-to-all splits heads: refuse head counts it cannot split before any batch.
    (Under tensor parallelism the per-rank counts are checked again at every attention call.)"""
    heads, kv_heads = head_counts(config)
    if heads is None:
        return
    try:
        check_heads(heads, kv_heads, ulysses)
    except ValueError as exc:
        raise BadValue(f"model type {config.model_type!r}: {exc}") from None


def _base_model(model):
    """The transformers model under a PEFT wrapper (whose forward takes position_ids in **kwargs
    and hands them on), or `model` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and type(model).__module__.startswith("peft") else model


def patch_model(
    model,
    group=None,
    layout: Layout = DEFAULT_LAYOUT,
    backend: str = "auto",
    local_logits: bool = False,
    keep_attention: bool = False,
):
    """Switch `model` (a transformers causal LM, or a PEFT model wrapping one) to ring attention
    over `group`, in place.

    Returns the model. Call it with `model(**ringpatch.shard_batch(batch, group, layout))`:
    every rank's `loss` is then the full-sequence loss, and gradients averaged over the
    group's ranks equal the unpatched model's. PEFT works in either order: get_peft_model on a
    patched model, or patch_model on a PEFT model (its base model is patched).
    keep_attention: attention-aware checkpointing for a model with activation checkpointing
    (non-reentrant): each layer's attention output and lse are kept from forward, and the layer's
    recompute in backward skips the ring forward (attention/ring.py, KeptAttention)."""
    import transformers

    check_transformers_version(transformers.__version__)
    if group is None and not dist.is_initialized() and launch_int("WORLD_SIZE", 1) > 1:
        raise RuntimeError(
            f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but no process group exists yet, so the ring would be this "
            "rank alone: call torch.distributed.init_process_group (or let accelerate/DeepSpeed start it) before "
            "ringpatch.patch_model"
        )
    outer, model = model, _base_model(model)
    check_layout(layout)
    check_backend(backend)
    config = model.config
    if getattr(model, "_ringpatch", None) is not None:
        raise BadValue("this model is already ring-patched; call ringpatch.unpatch_model(model) first")
    check_architecture(config, "model.config", causal_lm=False)
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise Unsupported(
            f"model type {config.model_type!r} ({type(model).__name__}) takes no position_ids, so its positions "
            "would restart at 0 on every rank; ring attention needs models that take global position_ids"
        )
    if not model._can_set_attn_implementation():
        raise Unsupported(
            f"model type {config.model_type!r} does not dispatch attention through transformers' AttentionInterface, "
            "so ring attention cannot be plugged in"
        )
    given, (group, sp_size, sp_rank) = group, resolve_group(group)
    if isinstance(given, UlyssesRing):  # kept whole: the attention needs its two levels
        group = given
        _check_ulysses_heads(config, given.ulysses)
    register()
    settings = RingSettings(
        group, layout, backend, sp_size, sp_rank, config._attn_implementation, local_logits, keep_attention
    )
    model.set_attn_implementation(IMPLEMENTATION)
    for module in model.modules():
        module._ringpatch = settings
    model._ringpatch_hooks = (
        model.register_forward_pre_hook(_check_call, with_kwargs=True),
        model.register_forward_hook(_full_loss, with_kwargs=True),
    )
    return outer


def unpatch_model(model):
    """Restore the attention implementation `model` had before patch_model, in place."""
    outer, model = model, _base_model(model)
    settings: RingSettings | None = getattr(model, "_ringpatch", None)
    if settings is None:
        raise BadValue("this model is not ring-patched")
    for hook in model._ringpatch_hooks:
        hook.remove()
    for module in model.modules():
        for name in ("_ringpatch", "_ringpatch_kept"):
            if name in module.__dict__:
                delattr(module, name)
    del model._ringpatch_hooks
    model.set_attn_implementation(settings.previous_implementation or "eager")
    return outer
