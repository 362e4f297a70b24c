"""RoPE settings for context-extension stages, and applying them to a loaded model.

The default rule for a stage's base is NTK-aware scaling (bloc97, 2023; the "NTK-aware"
interpolation of Peng et al. 2023, "YaRN", arXiv:2309.00071): to stretch a context of L0
tokens by s = L / L0, raise the base so the lowest frequency is interpolated by s while the
highest stays put: theta' = theta * s ** (d / (d - 2)), d the head dimension (derived in
docs/design.md, "The NTK rule").
"""

from __future__ import annotations

import math

from ringpatch.errors import BadValue, Unsupported

# transformers' RoPE types a stage may name, with the keys each needs beyond rope_type
# (original_max_position_embeddings defaults to the model's trained length, see apply_rope).
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}
ROPE_TYPE_KEYS = {
    "default": ("rope_theta",),
    "linear": ("factor", "rope_theta"),
    "dynamic": ("factor", "rope_theta"),
    "yarn": ("factor", "original_max_position_embeddings", "rope_theta", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings", "rope_theta", "attention_factor",
                 "factor"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "rope_theta"),
}  # fmt: skip
"""Every key transformers' RoPE of each type reads besides rope_type and partial_rotary_factor (its
validators' required and optional keys; tests/hf/test_rope.py holds this table to them): a key
outside it would be kept in the config and read by nothing, so a misspelt one is refused."""


def check_rope_scaling(scaling: dict, where: str = "rope_scaling", stage: bool = False) -> None:
    """A rope_scaling dict that apply_rope can hand to transformers: a known rope_type, its keys and
    no unknown ones, and positive finite factors. stage: a stage's rule, which changes the base only
    through the stage's rope_theta."""
    kind = scaling.get("rope_type", scaling.get("type"))
    known = ROPE_SCALING_KEYS if stage else ROPE_TYPE_KEYS
    if kind not in known:
        raise BadValue(
            f"{where}.rope_type {kind!r} is not one of {sorted(known)} (to change only the base, use the stage's rope_theta)"
        )
    if stage and "rope_theta" in scaling:
        raise BadValue(
            f"{where} sets rope_theta {scaling['rope_theta']!r}: a stage changes the RoPE base with its own rope_theta "
            "(beside no rope_scaling) or its rope_scaling's factors, not both; remove it from rope_scaling"
        )
    unknown = sorted(set(scaling) - {"rope_type", "type", "partial_rotary_factor", *ROPE_TYPE_KEYS[kind]})
    if unknown:
        raise BadValue(
            f"{where} of rope_type {kind!r} has unknown keys {unknown}; transformers reads "
            f"{sorted(ROPE_TYPE_KEYS[kind])} (and rope_type, partial_rotary_factor)"
        )
    missing = [key for key in ROPE_SCALING_KEYS.get(kind, ()) if key not in scaling]
    if missing:
        raise BadValue(f"{where} of rope_type {kind!r} needs {missing}; it has {sorted(scaling)}")
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        value = scaling.get(key)
        if value is not None and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        ):
            raise BadValue(f"{where}.{key} must be a positive finite number, got {value!r}")
    factor = scaling.get("factor")
    if kind != "longrope" and isinstance(factor, (int, float)) and factor < 1:
        raise BadValue(
            f"{where}.factor {factor} is below 1, which would shrink the context the model was trained for; "
            "an extension stage scales by seq_len / trained length (>= 1)"
        )


def ntk_rope_theta(theta: float, trained_len: int, seq_len: int, head_dim: int) -> float:
    """The NTK-aware base for extending a model trained at `trained_len` to `seq_len` tokens."""
    if min(theta, trained_len, seq_len) <= 0 or head_dim < 4 or head_dim % 2:
        raise BadValue(
            f"need theta > 0, lengths > 0 and an even head_dim >= 4; got theta={theta}, "
            f"trained_len={trained_len}, seq_len={seq_len}, head_dim={head_dim}"
        )
    scale = max(1.0, seq_len / trained_len)
    return theta * scale ** (head_dim / (head_dim - 2))


def apply_rope(model, max_positions: int, rope_theta: float | None = None, rope_scaling: dict | None = None):
    """Set the model's RoPE for a new stage in its config (so an exported config.json carries
    it) and rebuild its rotary-embedding modules from that config, in place."""
    if rope_theta is not None and rope_scaling is not None:
        raise BadValue("give rope_theta or rope_scaling, not both")
    config = model.config
    params = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default"})
    if rope_theta is not None:
        params["rope_theta"] = float(rope_theta)
    if rope_scaling is not None:
        params.update(rope_scaling)
        params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    config.rope_parameters = params
    config.max_position_embeddings = max(max_positions, config.max_position_embeddings)
    rebuilt = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if hasattr(child, "inv_freq") and hasattr(child, "rope_type"):
                device = child.inv_freq.device
                setattr(parent, name, type(child)(config=config).to(device))
                rebuilt += 1
    if not rebuilt:
        raise Unsupported(f"model type {config.model_type!r} has no rotary embedding module to update")
    return model


__all__ = ["ntk_rope_theta", "apply_rope", "check_rope_scaling", "ROPE_SCALING_KEYS", "ROPE_TYPE_KEYS"]
