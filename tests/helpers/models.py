"""Tiny Hugging Face causal LMs built from configs (nothing is downloaded)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

VOCAB = 101
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "mistral-w3": lambda: MistralConfig(**_COMMON, sliding_window=3),  # shorter than a chunk
    "mistral-w20": lambda: MistralConfig(**_COMMON, sliding_window=20),  # longer than a chunk
    "qwen2-sliding": lambda: Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=8),
}


def gemma2_config():
    """A model the ring cannot serve (attention soft-capping) and whose head caps logits."""
    return Gemma2Config(**{k: v for k, v in _COMMON.items() if k != "tie_word_embeddings"}, head_dim=8)


def build(name: str, seed: int = 0, dtype=torch.float32):
    """The same weights on every rank for a given seed; eager attention (the unpatched reference)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager")
    return model.to(dtype)


def batch(seq: int = 37, rows: int = 2, seed: int = 1, prompt: int = 5, pad_last_row: int = 0) -> dict:
    """input_ids and labels (prompt tokens ignored), with right padding on the last row if asked."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (rows, seq), generator=g)
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    out = {"input_ids": input_ids, "labels": labels}
    if pad_last_row:
        mask = torch.ones_like(input_ids)
        mask[-1, seq - pad_last_row :] = 0
        labels[mask == 0] = -100  # as HF collators do: the unpatched reference must not count pads
        out["attention_mask"] = mask
    return out
