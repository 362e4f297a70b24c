"""A model's architecture, checked once, before any process group, download or first forward.

check_architecture takes the recipe's model.config (or a folder's config.json, or a loaded
model's config), lets transformers' own config class validate it, then applies ringpatch's rules:
a causal LM, head counts the ring can split, an even head_dim for RoPE, RoPE parameters that
extend rather than shrink the context, and none of the features ring attention cannot honour.
`ringpatch train`'s preflight, `ringpatch plan` and patch_model all call it, so each refusal
reads the same wherever it is met.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from ringpatch.errors import BadValue, Unsupported
from ringpatch.hf.models import unsupported_features
from ringpatch.hf.rope import check_rope_scaling
from ringpatch.schema import POSITIVE

if TYPE_CHECKING:
    import torch


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _activation(value) -> bool:
    from transformers.activations import ACT2FN

    return isinstance(value, str) and value in ACT2FN


DECLARED = (
    ("vocab_size", "a positive integer", _positive_int),
    ("hidden_size", "a positive integer", _positive_int),
    ("num_hidden_layers", "a positive integer", _positive_int),
    ("num_attention_heads", "a positive integer", _positive_int),
    ("intermediate_size", "a positive integer", _positive_int),
    ("max_position_embeddings", "a positive integer (the trained length the RoPE rules extend)", _positive_int),
    ("head_dim", "null (hidden_size / heads) or a positive integer", lambda v: v is None or _positive_int(v)),
    ("sliding_window", "null (no window) or a positive integer (0 would be no window to the ring but a mask to "
     "stock transformers, so the trained model would export as another)", lambda v: v is None or _positive_int(v)),
    ("hidden_act", "one of transformers' activations (transformers.activations.ACT2FN)",
     lambda v: v is None or _activation(v)),
)  # fmt: skip
"""Keys of a model config that ringpatch reads (the ring, the RoPE rules, the plan, the export),
each with the one meaning it has everywhere: (key, what it must be, its check). A key a config
leaves out is transformers' default, checked once the config is built."""
POSITIVE_FLOATS = ("rope_theta", "rms_norm_eps")


def check_declared(config, where: str) -> None:
    """Every DECLARED key (and the positive numbers) of `config`, a dict or a built config, present
    in it; ValueError naming the key, the value and what it must be."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    present = config if isinstance(config, dict) else config.to_dict()
    for key, what, ok in DECLARED:
        if key in present and not ok(get(key)):
            raise BadValue(f"{where}.{key} must be {what}, got {get(key)!r}")
    rope = get("rope_parameters") or {}
    for key in POSITIVE_FLOATS:
        for name, value in ((key, present.get(key)), (f"rope_parameters.{key}", rope.get(key))):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):  # YAML reads 1e4 as text
                raise BadValue(f"{where}.{name} must be float, got {type(value).__name__} {value!r}")
            POSITIVE.check(f"{where}.{name}", value)


def _build(config: dict, where: str):
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise BadValue(f"{where} needs a model_type (e.g. llama); it has {sorted(config)}")
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its warnings about a config are ringpatch's refusals, one line each
    try:
        return AutoConfig.for_model(**copy.deepcopy(config))  # transformers fills in and may mutate its input
    except Exception as e:  # noqa: BLE001 (its validators raise their own classes; every one is a bad config)
        problem = " ".join(str(e).split())
        if problem.startswith("Unrecognized model identifier"):
            problem = f"transformers {_version()} has no model type {model_type!r}"
        raise BadValue(f"{where} is not a valid {model_type} config: {problem[:300]}") from None
    finally:
        logging.set_verbosity(verbosity)


def _version() -> str:
    import transformers

    return transformers.__version__


def _causal_lm(config, where: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise Unsupported(
            f"{where}: model type {config.model_type!r} is not a causal language model (transformers has no "
            "AutoModelForCausalLM for it); ringpatch trains decoders such as llama, mistral or qwen2"
        )


def head_counts(config) -> tuple[int | None, int | None]:
    """(query heads, key/value heads) of a transformers config or its dict; the K/V heads default
    to the query heads (multi-head attention), as transformers reads them."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    heads = get("num_attention_heads")
    return heads, get("num_key_value_heads") or heads


def _heads(config, where: str) -> None:
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        raise BadValue(f"{where}.num_attention_heads must be a positive integer, got {heads!r}")
    kv_heads = getattr(config, "num_key_value_heads", None)
    kv_heads = heads if kv_heads is None else kv_heads
    if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
        raise BadValue(
            f"{where}.num_key_value_heads {kv_heads!r} must be a positive divisor of the {heads} query heads "
            f"(each K/V head serves heads / kv_heads query heads); choose among "
            f"{[d for d in range(1, heads + 1) if heads % d == 0]}"
        )
    hidden = getattr(config, "hidden_size", None)
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and isinstance(hidden, int) and hidden % heads:
        raise BadValue(f"{where}.hidden_size {hidden} is not divisible by the {heads} attention heads")
    head_dim = head_dim if head_dim is not None else (hidden // heads if isinstance(hidden, int) else None)
    if isinstance(head_dim, int) and head_dim % 2:
        raise BadValue(
            f"{where}: head_dim {head_dim} is odd; rotary position embeddings rotate pairs of dimensions, so "
            "it must be even: change hidden_size or num_attention_heads (or head_dim)"
        )


def _rope(config, where: str) -> None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return
    check_rope_scaling({"rope_type": "default", **params}, f"{where}.rope_parameters")


def check_architecture(config, where: str = "model.config", causal_lm: bool = True):
    """The transformers config of `config` (a dict with model_type, or a config object), or a
    ValueError / NotImplementedError naming the key, the value and the fix. causal_lm: the model
    type must have an AutoModelForCausalLM (what the trainer loads; patch_model, which is handed a
    model, leaves that out)."""
    if isinstance(config, dict):
        check_declared(config, where)  # as given, before transformers fills in or converts
        config = _build(config, where)
    check_declared(config, where)
    if causal_lm:
        _causal_lm(config, where)
    problems = unsupported_features(config)
    if problems:
        raise Unsupported(f"model type {config.model_type!r}: ring attention cannot honour " + "; ".join(problems))
    _heads(config, where)
    _rope(config, where)
    return config


def decoder_layers(lm) -> list[torch.nn.Module]:
    """The model's repeated blocks: the modules of its `_no_split_modules` classes (the decoder
    layers of every Hugging Face causal LM that declares them)."""
    names = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise Unsupported(
            f"engine: fsdp2 shards a model layer by layer, and {type(lm).__name__} names no layer classes "
            "(_no_split_modules); use engine: deepspeed"
        )
    return layers


def check_model_type(model_type: str) -> None:
    """Before start: the causal LM class of `model_type` names its layer classes (decoder_layers)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is not None and not getattr(cls, "_no_split_modules", None):
        raise Unsupported(
            f"engine: fsdp2 shards a model layer by layer, and {name} names no layer classes (_no_split_modules); "
            "use engine: deepspeed"
        )
