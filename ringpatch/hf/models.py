"""What ringpatch knows about model types and transformers releases.

Which transformers releases the attention interface is written against, which model features
ring attention cannot honour exactly (each refused by name in patch_model), and which heads
are plain enough for the chunked loss.
"""

from __future__ import annotations

from packaging.version import Version

TRANSFORMERS_RANGE = (Version("5.0"), Version("6.0"))  # keep in step with setup.cfg
ALIBI_MODEL_TYPES = ("bloom", "mpt", "baichuan", "falcon")  # falcon only when config.alibi
PLAIN_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Causal LMs whose head is exactly logits = lm_head(final hidden states), no scaling or capping."""
GATED_MLP_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Causal LMs whose MLP is per token, down(act(gate(x)) * up(x)): the ones `mlp_tiles` may tile."""
RMSNORM_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Causal LMs whose norms are transformers' RMSNorm (float32 statistics): the ones `rmsnorm: chunked` takes."""


def check_transformers_version(version: str) -> None:
    low, high = TRANSFORMERS_RANGE
    if not low <= Version(version) < high:
        raise ImportError(
            f"ringpatch supports transformers >={low},<{high}; found {version}. "
            f"Install a supported release: pip install 'transformers>={low},<{high}'"
        )


def unsupported_features(config) -> list[str]:
    """Features of `config` that ring attention cannot honour exactly."""
    found = []
    if getattr(config, "is_encoder_decoder", False):
        found.append("encoder-decoder architecture (ring attention patches causal decoders only)")
    if hasattr(config, "type_vocab_size") and not getattr(config, "is_decoder", False):  # BERT-style encoders
        found.append(
            "bidirectional (encoder) attention: ring attention trains causal decoders; use a decoder-only model "
            "(or is_decoder: true for a BERT-style decoder)"
        )
    if getattr(config, "alibi", False) or (config.model_type in ALIBI_MODEL_TYPES and config.model_type != "falcon"):
        found.append("ALiBi position biases")
    for key in ("attn_logit_softcapping", "attention_logit_softcapping"):
        if getattr(config, key, None):
            found.append(f"attention soft-capping ({key}={getattr(config, key)})")
    dropout = getattr(config, "attention_dropout", 0.0) or 0.0
    if dropout > 0:
        found.append(f"attention dropout (attention_dropout={dropout}); set config.attention_dropout = 0.0")
    return found
