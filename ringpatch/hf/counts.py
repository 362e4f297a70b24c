"""What a Llama/Mistral-style architecture's config says about its size: head shapes, parameter
counts and the FLOPs of a forward (the plan, MFU and the evaluation's progress read them)."""

from __future__ import annotations

from ringpatch.hf.architecture import head_counts


def attention_shape(cfg: dict) -> tuple[int, int, int]:
    """(query heads, K/V heads, head_dim) of a Llama/Mistral-style config."""
    heads, kv_heads = head_counts(cfg)
    return heads, kv_heads, cfg.get("head_dim") or cfg["hidden_size"] // heads


def parameters(cfg: dict) -> tuple[int, int]:
    """(all parameters, embedding parameters) of a Llama/Mistral-style config."""
    h, v, n_layers = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    heads, kv, d = attention_shape(cfg)
    attn = h * heads * d * 2 + h * kv * d * 2
    mlp = 3 * h * cfg["intermediate_size"]
    emb = v * h * (1 if cfg.get("tie_word_embeddings") else 2)
    return n_layers * (attn + mlp + 2 * h) + h + emb, emb


def forward_flops(cfg: dict, seq_len: int, head_tokens: int | None = None) -> float:
    """Model FLOPs of one forward over `seq_len` tokens of one sequence: every matmul of the decoder
    (2 per multiply-add), the LM head at `head_tokens` positions (None: all of them), and causal
    attention over the whole sequence, QK^T and AV at half. Packed documents kept apart do less
    attention than this counts."""
    n, emb = parameters(cfg)
    heads, _, d = attention_shape(cfg)
    h, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    matmul = n - emb - (2 * n_layers + 1) * h  # the norms' weights multiply elementwise
    head = cfg["vocab_size"] * h
    attention = n_layers * 2 * seq_len * seq_len * heads * d
    return 2 * seq_len * matmul + 2 * head * (seq_len if head_tokens is None else head_tokens) + attention
