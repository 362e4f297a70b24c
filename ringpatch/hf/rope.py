"""RoPE settings for context-extension stages, and applying them to a loaded model.

The default rule for a stage's base is NTK-aware scaling (bloc97, 2023; the "NTK-aware"
interpolation of Peng et al. 2023, "YaRN", arXiv:2309.00071): to stretch a context of L0
tokens by s = L / L0, raise the base so the lowest frequency is interpolated by s while the
highest stays put: theta' = theta * s ** (d / (d - 2)), d the head dimension (derived in
docs/design.md, "The NTK rule").
"""

from __future__ import annotations


def ntk_rope_theta(theta: float, trained_len: int, seq_len: int, head_dim: int) -> float:
    """The NTK-aware base for extending a model trained at `trained_len` to `seq_len` tokens."""
    if min(theta, trained_len, seq_len) <= 0 or head_dim < 4 or head_dim % 2:
        raise ValueError(
            f"need theta > 0, lengths > 0 and an even head_dim >= 4; got theta={theta}, "
            f"trained_len={trained_len}, seq_len={seq_len}, head_dim={head_dim}"
        )
    scale = max(1.0, seq_len / trained_len)
    return theta * scale ** (head_dim / (head_dim - 2))


def apply_rope(model, max_positions: int, rope_theta: float | None = None, rope_scaling: dict | None = None):
    """Set the model's RoPE for a new stage in its config (so an exported config.json carries
    it) and rebuild its rotary-embedding modules from that config, in place."""
    if rope_theta is not None and rope_scaling is not None:
        raise ValueError("give rope_theta or rope_scaling, not both")
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
        raise NotImplementedError(f"model type {config.model_type!r} has no rotary embedding module to update")
    return model


__all__ = ["ntk_rope_theta", "apply_rope"]
