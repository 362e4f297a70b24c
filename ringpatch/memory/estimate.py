"""Per-GPU memory estimate of a recipe (printed by `ringpatch plan`, see ringpatch.train.plan).

The estimate counts, per GPU, in bytes (N = parameters, of which tp shards all but the embeddings):
- weights 2N (bf16), gradients 2N, optimizer 12N (fp32 master, Adam m and v), divided by the
  dp x sp ranks that ZeRO partitions them over (stage 1: optimizer; 2: + gradients; 3: + weights),
  optimizer (and stage-3 weights) moved to CPU by offload; below stage 2 an untied input
  embedding's gradient is left out (backward makes it last, after the activations are freed);
- checkpointed activations: one (tokens x hidden) input per layer and RoPE's cos/sin (none on
  the GPU with activation_offload: host_offload_gib counts them on the host, cos/sin per layer);
  without checkpointing, everything every layer saves (below);
- the recomputed layer: what one decoder layer saves for its backward, counted tensor by tensor
  for transformers' Llama/Mistral layer (tests/memory/test_census.py counts them with autograd's
  saved-tensor hooks): each RMSNorm a float32 copy of its input, the normalized input and its
  scaled output; roped q and k, v, the attention output and its float32 log-sum-exp; the MLP's
  gate, activation, up and product; plus the gradients of the layer's output and input (the
  backward frees each saved tensor as it uses it, so its other gradients take their place).
  With mlp_tiles the MLP saves only its input and its backward holds one tile's part;
- ring buffers: K and V blocks (current + in flight) and float32 dK/dV accumulators; with
  Ulysses x ring the same bytes (U times the tokens on 1/U of the K/V heads), times the
  repeat factor when U exceeds the K/V heads per tp rank;
- Ulysses all-to-all copies (ulysses > 1): q, k, v and the output in the other layout;
- kept attention outputs (keep_attention): per layer, the output (tokens x heads x head_dim)
  and its float32 log-sum-exp (tokens x heads), divided by tp;
- the loss: one chunk's float32 log-softmax, its gradient and the logits' gradient (three
  chunk x vocab float32 tensors at the peak of a chunk's backward), and the final norm's saved
  tensors, (4 + 2 x dtype bytes) x hidden per token.
A layer's backward and the loss's never overlap: the peak (total_gib) holds the larger.
With bf16=False (float32 training, as on CPU) every 2-byte tensor above is 4 bytes, and the
optimizer holds Adam's m and v only (8N: the weights are already float32).
bench/memory.py compares the activation items with measured peaks (2 CPU ranks, float32).
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


def layer_saved_bytes(cfg: dict, tp: int = 1, dtype_bytes: int = 2, tiled: bool = False) -> float:
    """Bytes per token that one transformers Llama/Mistral decoder layer saves for its backward:
    two RMSNorms (each a float32 copy of its input, the normalized input and its scaled output),
    roped q and k, v and the attention output, the float32 log-sum-exp, and the MLP's gate,
    activation, up and product (only the input, already counted, when the MLP is tiled)."""
    b, h = dtype_bytes, cfg["hidden_size"]
    heads, kv_heads, head_dim = attention_shape(cfg)
    norms = 2 * (4 + 2 * b) * h
    attention = ((2 * heads + 2 * kv_heads) * head_dim * b + heads * 4) / tp
    mlp = 0 if tiled else 4 * cfg["intermediate_size"] / tp * b
    return norms + attention + mlp


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
    # ZeRO-2/3 reduce gradients into partition buffers allocated at the start; below that each
    # gradient appears when backward produces it, an untied input embedding's last, after every
    # activation is freed: past the peak (bench/memory.py, ZeRO-0)
    late = 0 if zero >= 2 or cfg.get("tie_word_embeddings") else cfg["vocab_size"] * cfg["hidden_size"]
    grads = b * (n_tp - late) / (shards if zero >= 2 else 1)
    optim = 0 if offload else (12 if bf16 else 8) * n_tp / (shards if zero >= 1 else 1)
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv_heads, head_dim = attention_shape(cfg)
    kv_dim, q_dim = kv_heads * head_dim, heads * head_dim
    rep = kv_repeats(kv_heads // tp, ulysses) if ulysses > 1 else 1
    tokens = micro_batch * seq_len // sp  # per GPU
    tiles = recipe.mlp_tiles
    saved = layer_saved_bytes(cfg, tp, b, tiled=tiles > 1)  # per token, one layer's forward
    final_norm = (4 + 2 * b) * h
    rope = 2 * head_dim * b  # cos and sin, shared by the layers
    if not recipe.activation_checkpointing:
        ckpt = tokens * (layers * saved + rope)
    elif recipe.activation_offload:
        ckpt = 0
    else:
        ckpt = tokens * (layers * h * b + rope)
    tile = 4 * inter / tp / tiles * b if tiles > 1 else 0  # a tile's MLP tensors, in its own backward
    recompute = saved + tile if recipe.activation_checkpointing else 0
    work = tokens * (recompute + 2 * h * b)  # + the gradients of the layer's output and input
    ring = tokens * kv_dim * rep / tp * (2 * 2 * b + 2 * 4)
    a2a = tokens * (2 * q_dim + 2 * kv_dim * rep) / tp * b if ulysses > 1 else 0
    loss = min(recipe.loss_chunk_tokens, tokens) * cfg["vocab_size"] * 4 * 3
    items = {
        "weights": weights,
        "gradients": grads,
        "optimizer": optim,
        "checkpointed activations": ckpt,
        "recomputed layer": work,
        "ring buffers": ring,
        "final norm": tokens * final_norm,
        **({"all-to-all copies": a2a} if ulysses > 1 else {}),
        **({"kept attention outputs": layers * tokens * (q_dim * b + heads * 4) / tp} if recipe.keep_attention else {}),
        "loss chunk": loss,
    }
    return {k: v / GIB for k, v in items.items()}


# A layer's backward (its recompute, the ring's blocks, the all-to-all's copies) and the loss's
# (a chunk's logits, the final norm's saved tensors, freed once its backward has run) happen at
# different moments of a step: the peak holds the larger of the two.
LAYER_BACKWARD = ("recomputed layer", "ring buffers", "all-to-all copies")
LOSS_BACKWARD = ("loss chunk", "final norm")


def total_gib(items: dict[str, float]) -> float:
    """The peak of a step from estimate's items: everything held through the step (weights,
    gradients, optimizer, checkpointed and kept activations) plus the larger of a layer's
    backward and the loss's backward, which never overlap."""
    layer = sum(v for k, v in items.items() if k in LAYER_BACKWARD)
    loss = sum(v for k, v in items.items() if k in LOSS_BACKWARD)
    held = sum(v for k, v in items.items() if k not in LAYER_BACKWARD + LOSS_BACKWARD)
    return held + max(layer, loss)


def host_offload_gib(recipe, cfg: dict, seq_len: int, micro_batch: int, bf16: bool = True) -> float:
    """Host GiB per GPU that activation_offload holds (0 when off)."""
    if not recipe.activation_offload:
        return 0.0
    return offloaded_bytes(cfg, micro_batch * seq_len // recipe.parallel.sp, 2 if bf16 else 4) / GIB
