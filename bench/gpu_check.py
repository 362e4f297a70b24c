"""GPU check (`make gpu-check`): one script, torch and this repository only (no install, no
network; flash-attn when present, transformers for the memory check when present).

1. Kernels: every CUDA backend's block forward and backward (full, causal, half, windowed and
   window-edge blocks, and varlen calls of several documents, as the ring plans them; GQA 32:8;
   head_dim 128 and 36, the latter padded)
   against float64. Pass: rms error / rms of the float64 value <= TOL[dtype] for out, dq, dk, dv.
   The error of monolithic fused attention on the same inputs is printed beside it.
2. Simulated ring: one GPU plays all P ranks of a ring in turn (every planned block, every merge,
   forward and backward, dK/dV returned to their owners), zigzag and contiguous, causal and
   windowed; the assembled out, dq, dk, dv against float64, with the same tolerance.
3. The real ring: ringpatch.ring_attention (RingAttentionFn: ring_forward and ring_backward, head
   groups, the merge, Exchange and the Ulysses all-to-all where the group has peers) over a
   one-rank NCCL group (init_process_group with device_id), batch 2, GQA 32:8, one head group
   and K/V head groups in turn, and packed documents (cu_seqlens: the block's documents in one
   varlen flash call), against float64.
4. Throughput: the simulated ring's blocks + merges at S tokens vs monolithic fused attention
   (FlashAttention through SDPA, forced: never the math path) on the same GPU; the fraction is
   monolithic / ring. Fails below THROUGHPUT_TARGET.
5. Memory: a Llama-3-8B-shaped stack of 2 layers (random weights, bf16), ring-patched over the
   one-rank group, at 131,072 tokens, with activation checkpointing and each memory switch
   (keep_attention, activation_offload, offload + 8 MLP tiles: DeepSpeed's TiledMLP, or ringpatch's
   where DeepSpeed is not installed), and each one-node recipe, llama3-8b-256k-1node and
   llama3-8b-1m-1node (offload + 16 MLP tiles + chunked norms: the one-node recipes' binding
   configuration), with its own switches at its last stage's tokens per GPU, applied by the switch
   registry as the trainer applies them; parameter gradients dropped once whole (as ZeRO takes
   them; a tiled MLP's after its last tile): the peak of
   torch.cuda.max_memory_allocated above the weights against the planner's activations
   (ringpatch.plan.estimate); fails outside MEMORY_BAND. Offload's loss equals plain
   checkpointing's bit for bit, and on CUDA its page-locked host buffers hold exactly the plan's
   host bytes (ringpatch.memory.offload.HostBuffers). On CUDA, what the process holds on the device
   after the step (torch.cuda.mem_get_info: the context, the allocator's reserved pool) against the
   plan's tensors plus its reserve, in the same band. Step times, tokens/s and model TFLOP/s of the
   two-layer stack with its MFU against the GPU's data-sheet peak (reported, not held to a target),
   and the offload copies' cost (its step over plain checkpointing's).
6. DeepSpeed's ZeRO buffers (where DeepSpeed is installed): ZeRO-3 at world size 1 with the one-node
   recipe's DeepSpeed config, checkpointing and MLP tiles on a 2-layer Llama-3-8B-shaped stack: its
   gradient bucket and the weights it holds gathered in each phase of the backward, read from the
   engine (ringpatch.plan.zero_readout), against the plan's; fails where the plan holds less than
   DeepSpeed or more than MEMORY_BAND's upper end of it (the final norm's: an upper bound only).
The monolithic references run fused kernels: FlashAttention for full and causal blocks, the
memory-efficient kernel with an additive mask (K/V repeated) for masked ones; SDPA's math
fallback is refused. A summary table ends the output; bench/results/gpu_check.json keeps every
figure. Exit 1 when a check fails. Without CUDA: says so and exits 0. `--device cpu --quick` runs the same code
on CPU at small sizes (how it is tested without a GPU).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ringpatch.attention.blocks import Call, band_call, segments  # noqa: E402
from ringpatch.attention.kernels import MaskSpec, default_scale, select  # noqa: E402
from ringpatch.attention.kernels.base import backward_by_segment, forward_by_segment  # noqa: E402
from ringpatch.attention.layout import local_ranges  # noqa: E402
from ringpatch.attention.merge import merge_  # noqa: E402
from ringpatch.attention.ring import ring_plans  # noqa: E402

# rms error relative to the float64 value's rms: bf16 rounds at 2^-8 = 3.9e-3 per element; an
# attention output or gradient through it lands near that, so 1e-2 leaves room for the longer
# reductions of dk/dv without admitting a wrong mask or a lost block (those give errors ~ 1).
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}
THROUGHPUT_TARGET = 0.90  # monolithic / ring time: the ring's blocks within 10% of one fused call
MEMORY_BAND = (0.85, 1.15)  # measured / planned


def fused_attention(q, k, v, mask, scale, causal: bool):
    """torch's fused attention on (B, H, S, D) inputs, never its math fallback. mask: None (only
    `causal`) or a bool (m, n) mask. Flash for full and causal blocks in 16-bit (native GQA); the
    memory-efficient kernel with an additive mask, K/V repeated to the query heads, otherwise."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if mask is not None:
        full = bool(mask.all())
        tril = mask.shape[0] == mask.shape[1] and torch.equal(mask, torch.ones_like(mask).tril())
        if full or tril:
            mask, causal = None, tril and not full
    if mask is None and q.dtype in (torch.float16, torch.bfloat16):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal, enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(groups, 1) for x in (k, v))
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, is_causal=causal and bias is None)


def visible(q_pos, k_pos, causal, window):
    """(m, n) bool: query at q_pos[i] sees key at k_pos[j]."""
    i, j = q_pos[:, None], k_pos[None, :]
    vis = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool, device=q_pos.device)
    if causal:
        vis &= j <= i
    if window is not None:
        vis &= j > i - window
    return vis


def reference(q, k, v, mask, scale):
    """float64 attention under `mask`, with gradients. q (B, m, H, D); k, v (B, n, H_kv, D)"""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    p = s.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)  # a row that sees nothing: zeros
    return torch.einsum("bhij,bjhd->bihd", p, v)


def rel_rms(got, want):
    want = want.double()
    return ((got.double() - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def _inputs(m, n, heads, kv_heads, dim, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, dout = (torch.randn(1, m, heads, dim, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    k, v = (torch.randn(1, n, kv_heads, dim, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    return q, k, v, dout


def _float64(q, k, v, dout, mask, scale):
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference(*ref_in, mask, scale)
    ref.backward(dout)
    return [ref.detach()] + [x.grad for x in ref_in]


# --- 1. kernels -----------------------------------------------------------------------------
def block_cases(seq):
    """(name, m, n, call, causal, window): the block shapes the ring plans produce."""
    half = seq // 2
    edge = band_call(seq, seq, 0, seq, 0, 0, True, seq // 2)  # a window edge, trimmed as the planner does
    em, en = edge.q1 - edge.q0, edge.k1 - edge.k0
    return [
        ("full", seq, seq, Call(0, seq, 0, seq, "full", seq, 0), False, None),
        ("causal", seq, seq, Call(0, seq, 0, seq, "causal", 0, 0), True, None),
        ("half-q", half, seq, Call(0, half, 0, seq, "full", 2 * seq, 0), True, None),
        ("half-k", seq, half, Call(0, seq, 0, half, "full", seq, 0), True, None),
        ("window", seq, seq, Call(0, seq, 0, seq, "band", 0, 0), True, seq // 4),
        ("w-edge", em, en, Call(0, em, 0, en, "band", edge.q_pos, edge.k_pos), True, seq // 2),
        # varlen: a block's documents in one call (packed documents), on the diagonal and against earlier keys
        ("varlen-causal", seq, seq, Call(0, seq, 0, seq, "causal", 0, 0, (1, 3, half), (1, 3, half)), True, None),
        ("varlen-full", half, seq, Call(0, half, 0, seq, "full", 2 * seq, seq, (half // 3,), (seq // 4,)), True, None),
    ]


def block_mask(call, causal, window, device):
    """Which keys each query of `call` sees: by position, and inside its own document (a varlen call's segment)."""
    m, n = call.q1 - call.q0, call.k1 - call.k0
    mask = torch.zeros(m, n, dtype=torch.bool, device=device)
    for s in segments(call):
        q_pos = torch.arange(s.q_pos, s.q_pos + s.q1 - s.q0, device=device)
        k_pos = torch.arange(s.k_pos, s.k_pos + s.k1 - s.k0, device=device)
        seen = visible(q_pos, k_pos, causal, window)
        if s.kind == "causal":  # the kernel's own mask, top-left aligned inside the document
            seen = torch.ones_like(seen).tril()
        mask[s.q0 - call.q0 : s.q1 - call.q0, s.k0 - call.k0 : s.k1 - call.k0] = seen
    return mask


def check_block(kernel, case, device, dtype, heads, kv_heads, dim):
    name, m, n, call, causal, window = case
    q, k, v, dout = _inputs(m, n, heads, kv_heads, dim, device)
    scale = default_scale(dim)
    mask = block_mask(call, causal, window, device)
    want = _float64(q, k, v, dout, mask, scale)
    # monolithic: torch's fused attention on the same inputs, printed for comparison
    mono_in = [x.to(dtype).transpose(1, 2).requires_grad_() for x in (q, k, v)]
    mono = (
        fused_attention(*mono_in, mask, scale, causal)
        if device.type == "cuda"
        else F.scaled_dot_product_attention(*mono_in, attn_mask=mask, scale=scale, enable_gqa=True)
    )
    mono.backward(dout.to(dtype).transpose(1, 2))
    monos = [mono.detach().transpose(1, 2)] + [x.grad.transpose(1, 2) for x in mono_in]
    spec = MaskSpec(causal, window, scale)
    qd, kd, vd = (x.to(dtype) for x in (q, k, v))
    forward, backward = kernel.forward, kernel.backward
    if call.q_cuts and not getattr(kernel, "varlen", False):  # as the ring hands it such a kernel
        forward = functools.partial(forward_by_segment, kernel.forward)
        backward = functools.partial(backward_by_segment, kernel.backward)
    out, lse = forward(qd, kd, vd, call, spec)
    got = [out, *backward(dout.to(dtype), qd, kd, vd, out, lse.float(), call, spec)]
    rows = {
        label: {"rel_rms": rel_rms(g, w), "monolithic_rel_rms": rel_rms(mo, w)}
        for label, g, mo, w in zip(("out", "dq", "dk", "dv"), got, monos, want, strict=True)
    }
    return all(r["rel_rms"] <= TOL[dtype] for r in rows.values()), rows


# --- 2. and 3. the simulated ring -----------------------------------------------------------
def simulated_ring(kernel, q, k, v, dout, world, layout, window, timed=False):
    """Every rank of a `layout` ring over `world` ranks, played in turn on one device: the
    assembled (out, dq, dk, dv) in global order, and the seconds it took."""
    device, dtype, seq = q.device, q.dtype, q.shape[1]
    spec = MaskSpec(True, window, default_scale(q.shape[-1]))
    plans = ring_plans(layout, seq, world, True, window, kernel.tile)
    idx = [
        torch.cat([torch.arange(s, s + n) for s, n in local_ranges(layout, seq, world, r)]).to(device)
        for r in range(world)
    ]
    local = [(q[:, i], k[:, i], v[:, i], dout[:, i]) for i in idx]
    out_g, dq_g = torch.empty_like(q), torch.empty_like(q)
    dk_g = torch.zeros(k.shape, dtype=torch.float32, device=device)
    dv_g = torch.zeros(v.shape, dtype=torch.float32, device=device)
    _sync(device)
    start = time.perf_counter()
    for r in range(world):
        ql, _, _, dl = local[r]
        out = torch.zeros(ql.shape, dtype=torch.float32, device=device)
        lse = torch.full(ql.shape[:3], float("-inf"), dtype=torch.float32, device=device)
        for s, calls in enumerate(plans[r]):
            _, kl, vl, _ = local[(r - s) % world]
            for c in calls:
                o, lb = kernel.forward(ql[:, c.q0 : c.q1], kl[:, c.k0 : c.k1], vl[:, c.k0 : c.k1], c, spec)
                merge_(out[:, c.q0 : c.q1], lse[:, c.q0 : c.q1], o, lb)
        out = out.to(dtype)
        dq = torch.zeros(ql.shape, dtype=torch.float32, device=device)
        for s, calls in enumerate(plans[r]):
            src = (r - s) % world
            _, kl, vl, _ = local[src]
            for c in calls:
                rows, keys = slice(c.q0, c.q1), slice(c.k0, c.k1)
                dq_b, dk_b, dv_b = kernel.backward(
                    dl[:, rows], ql[:, rows], kl[:, keys], vl[:, keys], out[:, rows], lse[:, rows], c, spec
                )
                dq[:, rows] += dq_b
                owner = idx[src][keys]  # dK/dV go back to the rank that holds those keys
                dk_g[:, owner] += dk_b.float()
                dv_g[:, owner] += dv_b.float()
        if not timed:
            out_g[:, idx[r]], dq_g[:, idx[r]] = out, dq.to(dtype)
    _sync(device)
    return (out_g, dq_g, dk_g, dv_g), time.perf_counter() - start


def check_ring(kernel, seq, world, layout, window, device, dtype, heads, kv_heads, dim):
    q, k, v, dout = _inputs(seq, seq, heads, kv_heads, dim, device, seed=1)
    pos = torch.arange(seq, device=device)
    want = _float64(q, k, v, dout, visible(pos, pos, True, window), default_scale(dim))
    got, _ = simulated_ring(kernel, *(x.to(dtype) for x in (q, k, v, dout)), world, layout, window)
    rows = {label: rel_rms(g, w) for label, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True)}
    return all(e <= TOL[dtype] for e in rows.values()), rows


def one_rank_group(device):
    """The default process group of this one process: NCCL on a GPU (bound with device_id), gloo on CPU."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        if device.type == "cuda":
            dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
        else:
            dist.init_process_group("gloo", rank=0, world_size=1)
    return dist.group.WORLD


def check_real_ring(seq, device, dtype, heads, kv_heads, dim):
    """ringpatch.ring_attention itself, forward and backward, over the one-rank group: batch 2,
    the whole ring on one head group, then on each K/V head group in turn; against float64."""
    import ringpatch
    from ringpatch.attention import ring

    group = one_rank_group(device)
    g = torch.Generator(device="cpu").manual_seed(3)
    shapes = [(2, seq, h, dim) for h in (heads, kv_heads, kv_heads, heads)]
    q, k, v, dout = (torch.randn(s, generator=g, dtype=torch.float64).to(device) for s in shapes)
    pos = torch.arange(seq, device=device)
    mask = visible(pos, pos, True, None)
    want = [
        torch.cat(parts)
        for parts in zip(
            *(_float64(*(x[i : i + 1] for x in (q, k, v, dout)), mask, default_scale(dim)) for i in range(2)),
            strict=True,
        )
    ]
    results, default = {}, ring.GROUP_BYTES
    for label, budget in (("one head group", default), ("K/V head groups in turn", 1)):
        ring.GROUP_BYTES = budget
        try:
            inputs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
            out = ringpatch.ring_attention(*inputs, group=group, causal=True)
            out.backward(dout.to(dtype))
        finally:
            ring.GROUP_BYTES = default
        got = [out.detach(), *(x.grad for x in inputs)]
        results[label] = {n: rel_rms(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True)}
    # packed documents (one row's lengths for both rows): the own block's documents in varlen calls
    lengths = [1, 7, seq // 4, 3, seq // 2, seq - (1 + 7 + seq // 4 + 3 + seq // 2)]
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    cu = torch.tensor([0, *itertools.accumulate(lengths), *(seq + x for x in itertools.accumulate(lengths))])
    want = [
        torch.cat(parts)
        for parts in zip(
            *(
                _float64(
                    *(x[i : i + 1] for x in (q, k, v, dout)), mask & (doc[:, None] == doc[None, :]), default_scale(dim)
                )
                for i in range(2)
            ),  # fmt: skip
            strict=True,
        )
    ]
    inputs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    out = ringpatch.ring_attention(*inputs, group=group, causal=True, cu_seqlens=cu)
    out.backward(dout.to(dtype))
    got = [out.detach(), *(x.grad for x in inputs)]
    results["packed documents"] = {
        n: rel_rms(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True)
    }
    return all(e <= TOL[dtype] for r in results.values() for e in r.values()), results


def monolithic_seconds(q, k, v, dout):
    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    _sync(q.device)
    start = time.perf_counter()
    if q.device.type == "cuda":
        out = fused_attention(qt, kt, vt, None, default_scale(q.shape[-1]), causal=True)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    out.backward(dout.transpose(1, 2))
    _sync(q.device)
    return time.perf_counter() - start


def throughput(kernel, seq, world, device, dtype, heads, kv_heads, dim):
    q, k, v, dout = (x.to(dtype) for x in _inputs(seq, seq, heads, kv_heads, dim, device, seed=2))
    small = [x[:, : seq // 8] for x in (q, k, v, dout)]
    simulated_ring(kernel, *small, world, "zigzag", None, timed=True)  # warm-up
    monolithic_seconds(*small)
    ring = min(simulated_ring(kernel, q, k, v, dout, world, "zigzag", None, timed=True)[1] for _ in range(2))
    mono = min(monolithic_seconds(q, k, v, dout) for _ in range(2))
    return {"seq": seq, "world": world, "ring_s": ring, "monolithic_s": mono, "fraction": mono / ring}


# --- 4. memory ------------------------------------------------------------------------------
MEMORY_SWITCHES = {  # recipe switches of each configuration (activation checkpointing always on)
    "ckpt": {},
    "keep_attention": {"keep_attention": True},
    "offload": {"activation_offload": True},
    "offload+tiles8": {"activation_offload": True, "mlp_tiles": 8},
}  # and each of RECIPE_ROWS with its own switches (llama3-8b-1m-1node's MLP-tile backward binds it)


RECIPE_ROWS = ("llama3-8b-256k-1node", "llama3-8b-1m-1node")
"""The one-node recipes, each run with its own switches at its last stage's tokens per GPU."""


def recipe_configurations(lengths, quick):
    """{recipe: (its switch values, [its tokens per GPU])}; quick: at the quick length."""
    from ringpatch.plan import switches as registry
    from ringpatch.plan.recipe import load_recipe

    found = {}
    for name in RECIPE_ROWS:
        recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        last = recipe.stages[-1]
        tokens = last.seq_len * (last.micro_batch or recipe.micro_batch) // recipe.parallel.sp
        model_switches = {s.key: s.value(recipe) for s in registry.SWITCHES if not s.section}  # not the engine's
        found[name] = (model_switches, lengths if quick else [tokens])
    return found


def memory_check(lengths, device, dtype, quick=False):
    """Each memory switch on and off: one training step (forward + backward) of a Llama-3-8B-shaped
    stack (2 layers, random weights; quick: a small one), ring-patched over a one-rank group. Per
    configuration and length: the peak of allocated memory above the weights
    (torch.cuda.max_memory_allocated; on CPU the profiler's live-tensor peak) against the
    planner (ringpatch.plan.estimate's activations, total_gib: parameter gradients are dropped
    as they are made, as ZeRO takes them), and
    the step time; offload's copy cost is its step time over plain checkpointing's."""
    try:
        from transformers import AutoModelForCausalLM, LlamaConfig
    except ImportError:
        return {"skipped": "transformers is not installed"}
    import dataclasses

    import ringpatch
    from ringpatch.hf.counts import forward_flops
    from ringpatch.memory import causal_lm_loss
    from ringpatch.memory.offload import HOST_BUFFERS
    from ringpatch.parallel import ParallelDims
    from ringpatch.plan import switches as registry
    from ringpatch.plan.budget import estimate
    from ringpatch.plan.estimate import GIB, offloaded_bytes, total_gib
    from ringpatch.plan.items import Kind
    from ringpatch.plan.recipe import Recipe, from_dict
    from ringpatch.plan.reserve import reserve_for
    from ringpatch.plan.simulate import drop_when_whole
    from ringpatch.train.telemetry import peak_tflops

    group = one_rank_group(device)
    if quick:
        cfg = dict(vocab_size=4096, hidden_size=256, intermediate_size=896, num_hidden_layers=2,
                   num_attention_heads=8, num_key_value_heads=2)  # fmt: skip
    else:  # Llama-3-8B's layer, head and vocabulary, two layers
        cfg = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                   num_attention_heads=32, num_key_value_heads=8)  # fmt: skip
    configurations = {name: (sw, lengths) for name, sw in MEMORY_SWITCHES.items()}
    configurations |= recipe_configurations(lengths, quick)
    cfg.update(
        max_position_embeddings=max(max(seqs) for _, seqs in configurations.values()),
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    base_recipe = from_dict(Recipe, {"model": {"name": "check"}, "stages": [{"seq_len": max(lengths), "steps": 1}]})
    peak, _ = peak_tflops(device, dtype, None)  # a known GPU's data sheet; on CPU a matmul measured now
    rows = {}
    for name, (sw, seqs) in configurations.items():
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), dtype=dtype, attn_implementation="sdpa").to(device)
        recipe = dataclasses.replace(base_recipe, **sw)
        lm.train()
        lm = ringpatch.patch_model(
            lm, group=group, **registry.apply(recipe, lm)
        )  # the recipe's switches, as the trainer
        for p in lm.parameters():  # as ZeRO takes each gradient into its partition (the planner's activations)
            p.register_post_accumulate_grad_hook(drop_when_whole)
        for seq in seqs:
            ids = torch.randint(0, cfg["vocab_size"], (1, seq), device=device)
            batch = ringpatch.shard_batch({"input_ids": ids, "labels": ids}, group=group)
            causal_lm_loss(lm, batch, recipe.loss_chunk_tokens).backward()  # warm-up: kernels, gradients
            lm.zero_grad(set_to_none=True)
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            device_gib = weights_gib = None
            if device.type == "cuda":
                loss = causal_lm_loss(lm, batch, recipe.loss_chunk_tokens)
                loss.backward()
                _sync(device)
                measured = (torch.cuda.max_memory_allocated() - base) / GIB
                # what the process holds on the device: context, NCCL, the allocator's reserved pool
                free, total = torch.cuda.mem_get_info()
                device_gib, weights_gib = (total - free) / GIB, base / GIB
            else:
                from torch.profiler import ProfilerActivity, profile

                from ringpatch.plan.tracker import live_peak

                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    loss = causal_lm_loss(lm, batch, recipe.loss_chunk_tokens)
                    loss.backward()
                live = live_peak(prof)
                measured = None if live is None else live / GIB
            seconds = time.perf_counter() - start
            # offload's page-locked buffers (HostBuffers, a GPU run's path) against the plan's host bytes
            host = HOST_BUFFERS.held_bytes / GIB if sw.get("activation_offload") and device.type == "cuda" else None
            lm.zero_grad(set_to_none=True)
            est = estimate(
                recipe, dict(cfg, model_type="llama"), 1, seq, 1, dtype == torch.bfloat16, device.type == "cuda"
            )
            # the weights are in `base`; no optimizer step; each gradient dropped as it is made
            predicted = total_gib({k: v for k, v in est.items() if k.kind is not Kind.MODEL_STATE})
            ratio = None if measured is None else measured / predicted
            with_reserve = None
            if weights_gib is not None:  # the plan's tensors (these weights, no optimizer) and its reserve
                reserve = reserve_for(cfg, ParallelDims(1), seq, 1, dtype.itemsize, True, weights_gib + predicted)
                with_reserve = weights_gib + predicted + sum(reserve.values())
            # model FLOPs of the step (forward and backward, 3x the forward; recompute not counted) per second
            tflops = 3 * forward_flops(cfg, seq) / seconds / 1e12
            rows[f"{name} S={seq}"] = {"measured_gib": measured, "predicted_gib": predicted, "ratio": ratio,
                                       "device_gib": device_gib, "planned_with_reserve_gib": with_reserve,
                                       "seconds": seconds, "loss": loss.item(), "host_gib": host,
                                       "host_planned_gib": offloaded_bytes(cfg, seq, dtype.itemsize) / GIB,
                                       "tokens_per_s": seq / seconds, "tflops": tflops,
                                       "mfu": None if peak is None else tflops / peak}  # fmt: skip
        del lm
    for seq in lengths:
        ckpt, off = rows.get(f"ckpt S={seq}"), rows.get(f"offload S={seq}")
        if ckpt and off:
            off["copy_cost"] = off["seconds"] / ckpt["seconds"] - 1  # > 0.05: overlap the copies (issue 10)
    return rows


# --- 6. DeepSpeed's ZeRO buffers ----------------------------------------------------------------
ZERO_RECIPE = "llama3-8b-1m-1node"
ZERO_STEPS = 3  # the first records DeepSpeed's trace of modules; the later ones prefetch along it


def zero_check(device, dtype, quick=False):
    """DeepSpeed ZeRO-3 at world size 1 with the one-node recipe's DeepSpeed config, activation
    checkpointing and MLP tiles, on a Llama-3-8B-shaped stack of 2 layers (quick: a small one):
    the gradient bucket's bytes and the weights ZeRO-3 holds gathered in each phase of the
    backward, read from the engine (ringpatch.plan.zero_readout), against the plan's
    (ringpatch.plan.reserve.zero_buffers). Skipped where DeepSpeed or transformers is missing."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        from transformers import AutoModelForCausalLM, LlamaConfig
    except ImportError as e:
        return {"skipped": f"{e.name or 'DeepSpeed'} does not import here ({e})"}
    import dataclasses

    from ringpatch.plan.ds_config import deepspeed_config, load_overlay
    from ringpatch.plan.recipe import load_recipe
    from ringpatch.plan.reserve import zero_buffers
    from ringpatch.plan.switches.mlp_tiles import tile_mlps
    from ringpatch.plan.zero_readout import PHASES, ZeroReadout

    one_rank_group(device)
    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    recipe = load_recipe(ROOT / "recipes" / f"{ZERO_RECIPE}.yaml")
    recipe = dataclasses.replace(recipe, parallel=dataclasses.replace(recipe.parallel, sp=1, ulysses=1))
    config = deepspeed_config(recipe, dtype == torch.bfloat16, device.type == "cuda", load_overlay(recipe.deepspeed))
    if quick:  # bucket and limits scaled with the model, so that they bind as at full size
        cfg = dict(vocab_size=4096, hidden_size=256, intermediate_size=896, num_hidden_layers=2,
                   num_attention_heads=8, num_key_value_heads=2)  # fmt: skip
        config["zero_optimization"] |= {"reduce_bucket_size": 50000, "stage3_prefetch_bucket_size": 50000,
                                        "stage3_max_live_parameters": 150000, "stage3_param_persistence_threshold": 1000,
                                        "stage3_max_reuse_distance": 1e6}  # fmt: skip
    else:
        cfg = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                   num_attention_heads=32, num_key_value_heads=8)  # fmt: skip
    cfg |= {"tie_word_embeddings": False, "rope_theta": 500000.0, "max_position_embeddings": 4096}
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), dtype=dtype, attn_implementation="sdpa").to(device)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tile_mlps(lm, recipe.mlp_tiles)
    engine, *_ = deepspeed.initialize(model=lm, model_parameters=lm.parameters(), config=config)
    readout = ZeroReadout(engine, lm)
    for _ in range(ZERO_STEPS):
        readout.step_begin()
        ids = torch.randint(0, cfg["vocab_size"], (1, 256 if quick else 4096), device=device)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    b = dtype.itemsize
    plan = zero_buffers(config, dict(cfg, model_type="llama"), b, cuda=device.type == "cuda")
    rows = {"bucket": {"measured_bytes": max(readout.buckets), "planned_bytes": plan["held"]}}
    rows |= {f"gathered {p}": {"measured_bytes": readout.gathered[p] * b, "planned_bytes": plan[p]} for p in PHASES}
    del engine, readout
    return rows


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU smoke run)")
    parser.add_argument("--seq", type=int, default=65536, help="tokens for the throughput check")
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--out", default="bench/results/gpu_check.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; nothing to check (exit 0)")
        return 0
    started = time.perf_counter()
    block, ring_seq, seq = (64, 256, 1024) if args.quick else (512, 4096, args.seq)
    heads, kv_heads = (8, 2) if args.quick else (32, 8)
    dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.float32]
    if device.type == "cuda":
        dtypes.append(torch.float32)  # the memory-efficient kernel's path
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"gpu-check on {name}, torch {torch.__version__}")
    kernels = {}
    for backend in ("torch", "flash_attn"):
        try:
            kernels[backend] = select(backend, torch.empty(1, 1, 1, 128, device=device, dtype=dtypes[0]))
        except ValueError as exc:
            print(f"backend {backend}: not available ({exc})")
    report = {"device": name, "torch": torch.__version__, "tolerance": {str(k): v for k, v in TOL.items()}}
    summary, failures = [], 0

    def record(check, ok, figure):
        nonlocal failures
        failures += not ok
        summary.append((check, "ok" if ok else "FAIL", figure))

    for bname, kernel in kernels.items():  # 1. kernels
        for dtype in dtypes if bname == "torch" else [torch.bfloat16]:
            for dim in (128, 36) if bname == "torch" else (128,):
                for case in block_cases(block):
                    ok, rows = check_block(kernel, case, device, dtype, heads, kv_heads, dim)
                    key = f"{bname}/{str(dtype)[6:]}/d{dim}/{case[0]}"
                    report[key] = rows
                    worst = max(r["rel_rms"] for r in rows.values())
                    mono = max(r["monolithic_rel_rms"] for r in rows.values())
                    print(
                        f"{'ok  ' if ok else 'FAIL'} {key:<32} worst rel rms {worst:.2e} (monolithic {mono:.2e}, tol {TOL[dtype]:.0e})"
                    )
                    record(f"kernel {key}", ok, f"{worst:.2e}")  # fmt: skip
    for bname, kernel in kernels.items():  # 2. simulated ring
        for layout in ("zigzag", "contiguous"):
            for window in (None, ring_seq // 3):
                ok, rows = check_ring(kernel, ring_seq, 4, layout, window, device, dtypes[0], heads, kv_heads, 128)
                key = f"{bname}/ring P=4 {layout} {'causal' if window is None else f'window {window}'}"
                report[key] = rows
                errs = " ".join(f"{k} {e:.2e}" for k, e in rows.items())
                print(f"{'ok  ' if ok else 'FAIL'} {key:<40} rel rms {errs}")
                record(key, ok, f"{max(rows.values()):.2e}")
    ok, rows = check_real_ring(ring_seq, device, dtypes[0], heads, kv_heads, 128)  # 3. the real ring
    report["real ring"] = rows
    for label, errs in rows.items():
        print(
            f"{'ok  ' if ok else 'FAIL'} real ring, one rank, batch 2, {label}: rel rms "
            + " ".join(f"{k} {e:.2e}" for k, e in errs.items())
        )
        record(f"real ring, {label}", max(errs.values()) <= TOL[dtypes[0]], f"{max(errs.values()):.2e}")
    for bname, kernel in kernels.items():  # 4. throughput
        t = throughput(kernel, seq, args.world, device, dtypes[0], heads, kv_heads, 128)
        report[f"{bname}/throughput"] = t
        print(
            f"{bname}: S={seq} P={args.world} blocks+merges {t['ring_s']:.3f}s, monolithic {t['monolithic_s']:.3f}s, "
            f"fraction {t['fraction']:.3f} (target >= {THROUGHPUT_TARGET})"
        )
        # on a CPU (--quick) the fraction is reported, not held to the GPU's target
        passed = t["fraction"] >= THROUGHPUT_TARGET or device.type != "cuda"
        record(f"throughput {bname} S={seq} P={args.world}", passed, f"{t['fraction']:.3f}")
    lengths = [2048] if args.quick else [131072]  # 5. memory
    mem = memory_check(lengths, device, dtypes[0], quick=args.quick)
    report["memory"] = mem
    if "skipped" in mem:
        print(f"memory check skipped: {mem['skipped']}")
    for key, row in mem.items() if "skipped" not in mem else []:
        measured = "-" if row["measured_gib"] is None else f"{row['measured_gib']:.2f}"
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        cost = f", copies +{row['copy_cost']:.1%} of the step" if "copy_cost" in row else ""
        mfu = "" if row["mfu"] is None else f", MFU {row['mfu']:.2f}"
        print(f"memory {key}: measured {measured} GiB above the weights, planner {row['predicted_gib']:.2f} GiB "
              f"(ratio {ratio}), step {row['seconds']:.2f} s, {row['tokens_per_s']:,.0f} tokens/s, "
              f"{row['tflops']:.3g} TFLOP/s of model FLOPs{mfu}{cost}")  # fmt: skip
        in_band = row["ratio"] is not None and MEMORY_BAND[0] <= row["ratio"] <= MEMORY_BAND[1]
        record(f"memory {key} measured/planned", in_band, ratio)
        if row.get("device_gib") is not None:  # the whole process on the device against plan + reserve
            whole = row["device_gib"] / row["planned_with_reserve_gib"]
            print(f"memory {key}: the process holds {row['device_gib']:.2f} GiB of the device (mem_get_info), "
                  f"plan + reserve {row['planned_with_reserve_gib']:.2f} GiB (ratio {whole:.2f})")  # fmt: skip
            record(f"memory {key} device/plan+reserve", MEMORY_BAND[0] <= whole <= MEMORY_BAND[1], f"{whole:.2f}")
        plain = mem.get("ckpt " + key.split(" ", 1)[1])
        if key.startswith("offload S=") and plain:  # offload copies values: the same loss, bit for bit
            record(f"memory {key} loss = checkpointing's", row["loss"] == plain["loss"], f"{row['loss']:.6f}")
        if row["host_gib"] is not None:  # the pooled host buffers hold exactly the planned bytes
            print(f"memory {key}: host buffers {row['host_gib']:.4f} GiB, planned {row['host_planned_gib']:.4f}")
            record(f"memory {key} host buffers = planned", row["host_gib"] == row["host_planned_gib"],
                   f"{row['host_gib']:.4f}")  # fmt: skip
    zero = zero_check(device, dtypes[0], quick=args.quick)  # 6. DeepSpeed's ZeRO buffers
    report["zero"] = zero
    if "skipped" in zero:
        print(f"ZeRO buffers check skipped: {zero['skipped']}")
    for key, row in zero.items() if "skipped" not in zero else []:
        measured, planned = row["measured_bytes"], row["planned_bytes"]
        ratio = planned / measured if measured else float("inf")
        print(f"ZeRO-3 {key}: read from DeepSpeed {measured / 2**20:.2f} MiB, planned {planned / 2**20:.2f} MiB "
              f"(planned/read {ratio:.2f})")  # fmt: skip
        # the plan must hold what DeepSpeed holds; tiled MLPs make the final norm's an upper bound
        ok = measured <= planned and (key == "gathered final_norm" or planned <= MEMORY_BAND[1] * measured)
        record(f"ZeRO-3 {key} planned/read", ok, f"{ratio:.2f}")
    elapsed = time.perf_counter() - started
    report["seconds"] = elapsed
    print("\nsummary")
    for check, status, figure in summary:
        print(f"  {status:<4} {check:<52} {figure}")
    print(f"{failures} failure(s) in {len(summary)} checks, {elapsed:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
