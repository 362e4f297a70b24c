"""Per-GPU memory estimate of a recipe's stage (printed by `ringpatch plan`).

Model states by ZeRO stage, what lives through the step, and the largest of the backwards that
never overlap (a layer's phases: MLP, norm, attention; a loss chunk's; the final norm's), counted
as transformers' Llama/Mistral layer allocates them and held to the simulated rank
(plan/simulate.py, tests/plan/test_simulate.py). What each item holds: docs/memory.md and
docs/design.md, "The memory estimate"; what no tensor shows is reserve.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

from ringpatch.attention.ring import call_elements, head_groups
from ringpatch.attention.ulysses import kv_repeats
from ringpatch.hf.counts import attention_shape, parameters
from ringpatch.memory.rmsnorm import RMS_CHUNK_BYTES
from ringpatch.plan.items import Item, Phase

GIB = 2**30
NORM_BACKWARD_FP32 = 5
"""float32 (tokens x hidden) temporaries an RMSNorm's autograd backward holds at once (the
gradients of its float32 cast, pow, mean and scaling), beside its saved float32 copy."""
NORM_CHUNK_TEMPORARIES = 4
"""float32 (chunk x hidden) temporaries a chunked RMSNorm's backward holds at once."""
MLP_BACKWARD = 6
"""(tokens x intermediate) tensors a gated MLP's backward holds at its peak: three saved (gate,
activation, up) and three gradients."""


@dataclass(frozen=True)
class Shapes:
    """Bytes per token of the tensors a layer's step is made of, on one rank."""

    h: int  # hidden
    i: float  # intermediate / tp
    q: float  # query heads x head_dim / tp (the attention output too)
    kv: float  # K/V heads x head_dim / tp, times the Ulysses repeat
    heads: float  # query heads / tp
    d: int  # head_dim
    b: int  # bytes of a weight, gradient or activation element

    @property
    def copy(self) -> int:
        """RMSNorm's float32 copy of its input: none when the input is float32 already."""
        return 4 * self.h if self.b < 4 else 0


def shapes(cfg: dict, tp: int = 1, ulysses: int = 1, b: int = 2) -> Shapes:
    heads, kv_heads, d = attention_shape(cfg)
    rep = kv_repeats(kv_heads // tp, ulysses) if ulysses > 1 else 1
    return Shapes(
        cfg["hidden_size"], cfg["intermediate_size"] / tp, heads * d / tp, kv_heads * d * rep / tp, heads / tp, d, b
    )


def layer_saved_bytes(
    cfg: dict, tp: int = 1, dtype_bytes: int = 2, tiled: bool = False, chunked_norm: bool = False, ulysses: int = 1
) -> float:
    """Bytes per token that one transformers Llama/Mistral decoder layer saves for its backward:
    two RMSNorms (stock: each a float32 copy of its input, the normalized input and its scaled
    output; chunked: each its input and output), what the attention keeps (_attention_saved:
    roped q, K and V as the ring saves them, its output and log-sum-exp, with Ulysses the
    all-to-all's copy), and the MLP's gate, activation, up and product (only the input, already
    counted, when the MLP is tiled)."""
    s = shapes(cfg, tp, ulysses, dtype_bytes)
    norms = 4 * s.b * s.h if chunked_norm else 2 * (4 + 2 * s.b) * s.h  # chunked: both norms' inputs and outputs
    attention = _attention_saved(s, False, ulysses)
    mlp = 0 if tiled else 4 * s.i * s.b
    return norms + attention + mlp


def _attention_saved(s: Shapes, keep: bool, ulysses: int) -> float:
    """What the attention keeps for its backward: roped q, K and V stacked (as the ring saves them),
    the output (held by keep_attention instead) and the float32 lse; with Ulysses the all-to-all
    keeps one more query-sized copy."""
    out = 0 if keep else s.q * s.b
    return s.q * s.b + 2 * s.kv * s.b + out + 4 * s.heads + (s.q * s.b if ulysses > 1 else 0)


def _ring_working_set(
    s: Shapes, tokens: int, micro_batch: int, sp: int, ulysses: int, kernel: str, chunked_layout: bool = True
) -> float:
    """Bytes per token of the ring's backward over one head group, and the largest kernel call's
    outputs. Under zigzag or balanced placement with more than one ring rank a call's queries or
    its keys span the whole local block (a rank's two chunks are neighbours on rank P-1, and a
    remote block's are for P = 2), the other side one chunk; otherwise both sides may span it
    (chunked_layout False: contiguous; one ring rank: the causal call over the whole block).
    dq, dk and dv in the input dtype: with head groups, allocated whole before the groups and
    filled by each, so beside every call; with one group, cast from the float32 accumulators after
    the last call, so instead of a call's outputs."""
    kv_heads = s.kv / s.d  # per ring rank's heads, as the ring sees them (tokens x U, heads / U)
    groups = head_groups((micro_batch, tokens // micro_batch, int(s.heads), s.d), max(1, int(kv_heads)))
    ring = sp // ulysses
    dkv = 2 * s.kv * 4 / groups
    work = 4 * s.q / groups + (4 * dkv + 2 * 2 * s.kv * s.b / groups if ring > 1 else dkv)
    copies = s.q * s.b + 2 * s.kv * s.b if groups > 1 or s.b < 4 else 0  # dq, dk, dv in the input dtype
    if groups > 1:
        work += 2 * s.kv * s.b / groups  # the group's K/V, contiguous
    queries = s.q  # dq of the call's queries
    if kernel == "efficient" and s.kv < s.q:  # K/V repeated to the query heads; dK/dV come back repeated, summed
        keys = 4 * s.q + 2 * s.kv
    else:  # flash (native GQA), the CPU kernel, or no heads to repeat: dk, dv of the call's keys
        keys = 2 * s.kv
    if ring > 1 and chunked_layout:
        call = max(queries + keys / 2, queries / 2 + keys) * s.b / groups
    else:
        call = (queries + keys) * s.b / groups
    return work + (copies + call if groups > 1 else max(copies, call))


def kernel_kind(b: int, cuda: bool = True) -> str:
    """Which fused kernel the ring's full and causal calls use: flash for 2-byte inputs on a GPU,
    the memory-efficient kernel for float32 on a GPU, the CPU kernel elsewhere."""
    if not cuda:
        return "cpu"
    return "flash" if b < 4 else "efficient"


def kernel_call_elements(s: Shapes, tokens: int, micro_batch: int, ulysses: int) -> int:
    """Elements of the largest query tensor one attention kernel call takes (ring.call_elements),
    at the shape the ring sees: under Ulysses U times the tokens and 1/U of the heads."""
    heads, kv_heads = int(s.heads) // ulysses, max(1, int(s.kv / s.d) // ulysses)
    return call_elements((micro_batch, tokens * ulysses // micro_batch, heads, s.d), kv_heads)


def loss_chunk_bytes(vocab: int, s: Shapes, tokens: int, chunk: int, tp: int = 1) -> float:
    """The chunked loss's backward (hf/loss.py): a chunk's float32 logits, their log-softmax and
    gradient; with one chunk, the LM head's weight gradient as its backward makes it, beside the
    logits' gradient. Past the first chunk the LM head's gradient builds up over the chunks, beside the
    logits, and autograd adds each chunk's into the sum out of place (the sum so far, the chunk's,
    the new sum: three at once; a real CPU run shows the same, tests/plan/test_simulate.py), and
    the hidden states' gradient builds up too."""
    logits = chunk * vocab * 4 * 3
    head = vocab * s.h * s.b / tp
    if tokens <= chunk:  # one chunk: at the head's backward, its weight gradient beside the logits' gradient
        return max(logits, chunk * vocab * 4 + head + tokens * s.b * s.h)
    return max(logits + head, 3 * head) + tokens * s.b * s.h


def norm_bytes(s: Shapes, chunked: bool) -> tuple[float, float, float]:
    """Per token: both norms' saved tensors, the input norm's alone, and the final norm's saved
    tensors. Stock: each keeps a float32 copy of its input (none in float32, where the post-attention
    norm keeps its input itself), the normalized input and its output, and 1/rms; the final norm
    keeps its float32 input either way (in float32 the last layer's output itself, which nothing
    else holds); chunked: its input where no one else keeps it (the residual), its output and 1/rms."""
    if chunked:
        return 3 * s.b * s.h + 8, s.b * s.h + 4, 2 * s.b * s.h + 4
    return s.copy + 4 * s.h + 4 * s.b * s.h + 8, s.copy + 2 * s.b * s.h + 4, 4 * s.h + 2 * s.b * s.h


def norm_backward_bytes(s: Shapes, tokens: int, chunked: bool) -> float:
    """What one RMSNorm's backward holds besides its saved tensors and the gradient coming in:
    stock, five float32 (tokens x hidden) temporaries and its float32 copy (its input in float32);
    chunked, its input's gradient and four float32 temporaries of one chunk."""
    if chunked:
        return tokens * s.b * s.h + NORM_CHUNK_TEMPORARIES * min(RMS_CHUNK_BYTES, tokens * 4 * s.h)
    return tokens * (NORM_BACKWARD_FP32 + 1) * 4 * s.h


@dataclass(frozen=True)
class LayerFlags:
    """What the recipe's switches and grid change inside a decoder layer's backward (built from a
    recipe by plan/switches.layer_flags)."""

    tiles: int = 1
    """mlp_tiles."""
    tile_grads: bool = False
    """The tiled MLP's weight gradients build up whole over its tiles (ZeRO reduces them after the
    last; without ZeRO they are the model's gradients, counted there)."""
    keep: bool = False
    """keep_attention: the attention output is held by the switch, not saved by the ring."""
    offload: bool = False
    """activation_offload (with checkpointing): the layer's input comes back from the host."""
    kernel: str = "flash"
    """The ring's kernel (kernel_kind)."""
    chunked_norm: bool = False
    """rmsnorm: chunked."""
    chunked_layout: bool = True
    """A zigzag or balanced layout (two chunks a rank); False: contiguous."""


def layer_backward(
    s: Shapes, tokens: int, micro_batch: int, sp: int, ulysses: int, flags: LayerFlags
) -> dict[Item, float]:
    """Bytes of a layer's backward, by phase (MLP, norm, attention): the largest is its peak."""
    tiles, keep, offload, chunked_norm = flags.tiles, flags.keep, flags.offload, flags.chunked_norm
    grad_in = s.b * s.h  # the gradient arriving from the layer above
    norms, input_norm, _ = norm_bytes(s, chunked_norm)
    # the layer's input, copied back from the host for the recompute: held by the MLP's backward
    # (the layer's first), then released, unless the input norm keeps it to its backward: a chunked
    # norm does, and so does a stock one in float32, whose float32 "copy" is the input itself
    unpacked = s.b * s.h if offload else 0
    kept_input = unpacked if chunked_norm or s.b == 4 else 0
    attention = _attention_saved(s, keep, ulysses)
    # the MLP's backward over one tile (all its tokens untiled): its six (tokens x intermediate)
    # tensors at their peak, or five and the down projection's weight gradient (hidden x intermediate,
    # not per token: at a few thousand tokens a rank it is the larger)
    per_tile = tokens / max(1, tiles)
    mlp_work = max(MLP_BACKWARD * per_tile * s.i, (MLP_BACKWARD - 1) * per_tile * s.i + s.h * s.i) * s.b / tokens
    if tiles > 1:  # and the tiled MLP's accumulated input gradient
        mlp = mlp_work + s.b * s.h * (1 + 1 / tiles)
    else:
        mlp = mlp_work
    # chunked, the attention's output norm keeps its input, the residual, and 1/rms; its backward
    # also holds the gradient coming in from the MLP's input (the simulated rank's count; the stock
    # norm's is among its float32 temporaries) and, offloaded, the layer's input copied back
    residual = 2 * s.b * s.h + 4 + kept_input if chunked_norm else 0
    # by the attention's backward, the output projection's has run and freed its saved input:
    # under Ulysses that is the all-to-all's gathered copy of the output
    attention_at_its_backward = _attention_saved(s, keep, 1)
    return {
        Item.MLP_BACKWARD: tokens * (norms + attention + mlp + grad_in + unpacked)
        + (3 * s.h * s.i * s.b if flags.tile_grads else 0),  # gate, up and down's gradients, whole
        Item.NORM_BACKWARD: norm_backward_bytes(s, tokens, chunked_norm)
        + tokens * (residual + input_norm + grad_in + attention),
        Item.ATTENTION_BACKWARD: tokens
        * (
            input_norm
            + grad_in
            + s.q * s.b  # the gradient of the attention's output
            + attention_at_its_backward
            + _ring_working_set(s, tokens, micro_batch, sp, ulysses, flags.kernel, flags.chunked_layout)
            + kept_input
        ),
    }


def offloaded_bytes(cfg: dict, tokens: int, dtype_bytes: int = 2) -> float:
    """Host bytes per rank under activation_offload: every layer's hidden input, each in a
    page-locked buffer of exactly its size (ringpatch.memory.offload.HostBuffers)."""
    return cfg["num_hidden_layers"] * tokens * cfg["hidden_size"] * dtype_bytes


@dataclass(frozen=True)
class StateFlags:
    """Where the model states live (built from a recipe by plan/switches.state_flags)."""

    optimizer_on_host: bool = False
    """The optimizer step in host memory: its state and the gradient partitions leave the GPU."""
    parameters_on_host: bool = False
    """The parameter shards too (ZeRO-3's offload_param, FSDP2's CPU offload)."""


def model_states(
    recipe, cfg: dict, world: int, b: int, cuda: bool = True, flags: StateFlags | None = None
) -> dict[Item, float]:
    """Bytes per GPU of weights, gradients and optimizer under the recipe's ZeRO stage, with the
    states `flags` puts on the host left out. On a CPU the gradients are memory only as the
    layers' backward writes them (Item.GRADIENTS_AS_MADE). With the optimizer offloaded DeepSpeed
    keeps the gradient partitions with it in host memory (stage3.py: the partition buffer on the
    optimizer's device; stage_1_and_2.py copies each reduced partition to the host): the GPU holds
    only the gradient buckets (reserve.zero_buffers)."""
    flags = flags or StateFlags()
    tp = recipe.parallel.tp
    shards = world // tp  # dp x sp
    n, emb = parameters(cfg)
    n_tp = (n - emb) / tp + emb
    zero = recipe.zero.stage
    if recipe.engine == "fsdp2":  # float32 shards (the master weights), their gradients, AdamW's moments
        on_gpu = 0 if flags.parameters_on_host else n_tp / shards
        grads = Item.GRADIENTS if cuda else Item.GRADIENTS_AS_MADE
        return {Item.WEIGHTS: 4 * on_gpu, grads: 4 * on_gpu, Item.OPTIMIZER: 8 * on_gpu}
    weights = b * n_tp / (shards if zero == 3 else 1) * (0 if flags.parameters_on_host and zero == 3 else 1)
    # ZeRO-2/3 reduce gradients into partition buffers allocated at the start; below that each
    # gradient appears when backward produces it, an untied input embedding's last, after every
    # activation is freed: past the peak (bench/memory.py, ZeRO-0)
    late = 0 if zero >= 2 or cfg.get("tie_word_embeddings") else cfg["vocab_size"] * cfg["hidden_size"]
    grads = 0 if flags.optimizer_on_host else b * (n_tp - late) / (shards if zero >= 2 else 1)
    optim = 0 if flags.optimizer_on_host else (12 if b < 4 else 8) * n_tp / (shards if zero >= 1 else 1)
    return {Item.WEIGHTS: weights, Item.GRADIENTS if cuda else Item.GRADIENTS_AS_MADE: grads, Item.OPTIMIZER: optim}


def total_gib(items: dict[Item, float]) -> float:
    """The peak of a step from estimate's items: everything held through the step plus the
    largest of a layer's backward, a loss chunk's, the final norm's and the input embedding's,
    which never overlap (each item's Phase)."""
    held, backwards = 0.0, {}
    for item, value in items.items():
        if item.phase is Phase.STEP:
            held += value
        else:
            backwards[item.phase] = backwards.get(item.phase, 0.0) + value
    if Phase.EMBEDDING in backwards:  # what the layers' backward wrote on a CPU is still there
        backwards[Phase.EMBEDDING] += sum(
            items.get(i, 0.0) for i in (Item.GRADIENTS_AS_MADE, Item.ZERO_BUCKETS_AS_FILLED)
        )
    return held + max(backwards.values(), default=0.0)
