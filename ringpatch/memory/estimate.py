"""Per-GPU memory estimate of a recipe (printed by `ringpatch plan`, see ringpatch.train.plan).

The estimate counts, per GPU, in bytes (N = parameters, of which tp shards all but the embeddings):
- weights 2N (bf16), gradients 2N, optimizer 12N (fp32 master, Adam m and v), divided by the
  dp x sp ranks that ZeRO partitions them over (stage 1: optimizer; 2: + gradients; 3: + weights),
  optimizer (and stage-3 weights) moved to CPU by offload;
- checkpointed activations: one (tokens x hidden) bf16 input per layer; none on the GPU with
  activation_offload (host_offload_gib counts them on the host, with each layer's RoPE cos/sin);
- the working set of the layer being recomputed: about tokens x (8 hidden + 3 intermediate) bf16
  (q, k, v, attention out and residual tensors, the MLP's gate, up and product), the MLP's part
  divided by mlp_tiles (a tiled MLP holds one tile's at a time);
- ring buffers: K and V blocks (current + in flight) and float32 dK/dV accumulators; with
  Ulysses x ring the same bytes (U times the tokens on 1/U of the K/V heads), times the
  repeat factor when U exceeds the K/V heads per tp rank;
- Ulysses all-to-all copies (ulysses > 1): q, k, v and the output in the other layout;
- kept attention outputs (keep_attention): per layer, the output (tokens x heads x head_dim, bf16)
  and its float32 log-sum-exp (tokens x heads), divided by tp;
- the loss: one chunk of float32 logits and its gradient.
With bf16=False (float32 training, as on CPU) every 2-byte tensor above is 4 bytes, and the
optimizer holds Adam's m and v only (8N: the weights are already float32).
It is an estimate for choosing a layout, not a promise: allocator slack and NCCL buffers come on top.
"""

from __future__ import annotations

from ringpatch.attention.ulysses import kv_repeats

GIB = 2**30


def attention_shape(cfg: dict) -> tuple[int, int, int]:
    """(query heads, K/V heads, head_dim) of a Llama/Mistral-style config."""
    heads = cfg["num_attention_heads"]
    return heads, cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or cfg["hidden_size"] // heads


def offloaded_bytes(cfg: dict, tokens: int, dtype_bytes: int = 2) -> float:
    """Host bytes per rank under activation_offload: every layer's hidden input plus its RoPE cos
    and sin (copied per layer)."""
    head_dim = attention_shape(cfg)[2]
    return cfg["num_hidden_layers"] * tokens * (cfg["hidden_size"] + 2 * head_dim) * dtype_bytes


def parameters(cfg: dict) -> tuple[int, int]:
    """(all parameters, embedding parameters) of a Llama/Mistral-style config."""
    h, v, n_layers = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    heads, kv, d = attention_shape(cfg)
    attn = h * heads * d * 2 + h * kv * d * 2
    mlp = 3 * h * cfg["intermediate_size"]
    emb = v * h * (1 if cfg.get("tie_word_embeddings") else 2)
    return n_layers * (attn + mlp + 2 * h) + h + emb, emb


def estimate(recipe, cfg: dict, world: int, seq_len: int, micro_batch: int, bf16: bool = True) -> dict[str, float]:
    """GiB per GPU, by item, for one stage. bf16: the training precision (False: float32)."""
    b = 2 if bf16 else 4  # bytes of a weight, gradient or activation element
    sp, tp, ulysses = recipe.parallel.sp, recipe.parallel.tp, recipe.parallel.ulysses
    shards = world // tp  # dp x sp
    n, emb = parameters(cfg)
    n_tp = (n - emb) / tp + emb
    zero, offload = recipe.zero.stage, recipe.zero.offload == "cpu"
    weights = b * n_tp / (shards if zero == 3 else 1) * (0 if offload and zero == 3 else 1)
    grads = b * n_tp / (shards if zero >= 2 else 1)
    optim = 0 if offload else (12 if bf16 else 8) * n_tp / (shards if zero >= 1 else 1)
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv_heads, head_dim = attention_shape(cfg)
    kv_dim, q_dim = kv_heads * head_dim, heads * head_dim
    rep = kv_repeats(kv_heads // tp, ulysses) if ulysses > 1 else 1
    tokens = micro_batch * seq_len // sp  # per GPU
    mlp = 3 * inter / tp / recipe.mlp_tiles  # per token, elements
    ckpt = layers * tokens * h * b if recipe.activation_checkpointing else layers * tokens * (8 * h + mlp) * b
    if recipe.activation_offload:
        ckpt = 0
    work = tokens * (8 * h + mlp) * b
    ring = tokens * kv_dim * rep / tp * (2 * 2 * b + 2 * 4)
    a2a = tokens * (2 * q_dim + 2 * kv_dim * rep) / tp * b if ulysses > 1 else 0
    loss = min(recipe.loss_chunk_tokens, tokens) * cfg["vocab_size"] * 4 * 2
    items = {
        "weights": weights,
        "gradients": grads,
        "optimizer": optim,
        "checkpointed activations": ckpt,
        "recomputed layer": work,
        "ring buffers": ring,
        **({"all-to-all copies": a2a} if ulysses > 1 else {}),
        **({"kept attention outputs": layers * tokens * (q_dim * b + heads * 4) / tp} if recipe.keep_attention else {}),
        "loss chunk": loss,
    }
    return {k: v / GIB for k, v in items.items()}


def host_offload_gib(recipe, cfg: dict, seq_len: int, micro_batch: int, bf16: bool = True) -> float:
    """Host GiB per GPU that activation_offload holds (0 when off)."""
    if not recipe.activation_offload:
        return 0.0
    return offloaded_bytes(cfg, micro_batch * seq_len // recipe.parallel.sp, 2 if bf16 else 4) / GIB
