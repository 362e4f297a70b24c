"""What the plan adds to the step's tensors: DeepSpeed's own buffers, which the simulated rank does
not run (arithmetic from the DeepSpeed config, its defaults where the config is silent), and a
reserve per process for what no tensor shows: on a GPU the CUDA context and workspaces, NCCL's
buffers per communicator, the attention kernels' scratch and fragmentation; on a CPU the
process's measured runtime (CPU_RUNTIME_GIB). Each item and its source: docs/memory.md.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass

from ringpatch.attention.ring import head_groups
from ringpatch.hf.counts import attention_shape, parameters
from ringpatch.parallel.process import NCCL_DEFAULTS
from ringpatch.plan.estimate import GIB, Shapes, kernel_kind, shapes
from ringpatch.plan.items import Item

CUDA_CONTEXT_GIB = 1.0
NCCL_COLLECTIVE_BYTES = {2: 544e6, 3: 688e6}
"""A communicator's buffers once it has run a collective, per rank: 544 MB with 2 members, 688 MB
with 3 or more (NVIDIA/nccl#964: 4 x A100 over NVLink, one 4 MB all-reduce per communicator)."""
NCCL_P2P_BYTES_PER_PEER = (4.34e9 - 1.06e9) / 7
"""Point-to-point buffers per peer a rank sends to or receives from (the ring's neighbours, every
other member of an all-to-all): the first all_to_all_single over 8 H100s grew a rank's NCCL memory
from 1.06 to 4.34 GB, 32 channels to each of 7 peers (NVIDIA/nccl#1685)."""
NCCL_DEFAULT_BUFFSIZE = 4 * 2**20
"""NCCL's default NCCL_BUFFSIZE, at which the figures above were measured: another value scales them."""
NVLS_BYTES = 288 * 2**20
"""NVLink SHARP's buffers per communicator of more than 2 members, on NVSwitch systems (H100/H200
HGX), when NCCL_NVLS_ENABLE is not 0 (the trainer sets 0 unless the user set it:
parallel/process.py NCCL_DEFAULTS)."""
FRAGMENTATION = 0.05
CPU_RUNTIME_GIB = 0.70
"""A CPU rank's resident memory besides the step's tensors, measured (docs/measurements.md): the
imported stack 0.43 GiB (torch 0.21, transformers 0.12, DeepSpeed 0.02, datasets 0.08); the built
trainer, what preparing the data leaves (modules, caches; its freed heap is returned) and the
allocator's pools after a few hundred steps, 0.25 more (the demo's preparing rank: 0.67 resident,
step peaks 0.716 with 0.035 of step tensors)."""


def zero_buffers(
    ds_config: dict | None, cfg: dict, b: int, tp: int = 1, cuda: bool = True, checkpointing: bool = True
) -> dict[str, float]:
    """Bytes of DeepSpeed's ZeRO buffers: the gradient buckets ("held", through the backward) and,
    with stage 3, the weights gathered in each phase of the backward (zero3_gathered's phases). DeepSpeed allocates its gradient bucket whole,
    which a GPU's allocator holds; on a CPU only the pages a model's gradients touch are resident.
    The buckets (contiguous_gradients): reduce_bucket_size elements of the gradients' dtype,
    stage 3 one per communication dtype (stage3.py ipg_buckets), stages 1 and 2 a second one
    while overlap_comm (stage_1_and_2.py setup_buckets). tests/plan/test_zero_buffers.py reads
    both kinds from a DeepSpeed engine."""
    zero = (ds_config or {}).get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage == 0:
        return {"held": 0.0}
    bucket = float(zero.get("reduce_bucket_size", 5e8))
    if not cuda:
        bucket = min(bucket, float(parameters(cfg)[0]) / tp)
    double = stage < 3 and zero.get("overlap_comm", False)
    held = bucket * b * (2 if double else 1) if zero.get("contiguous_gradients", True) else 0.0
    if stage < 3:
        return {"held": held}
    return {"held": held} | {phase: n * b for phase, n in zero3_gathered(cfg, zero, tp, checkpointing).items()}


def zero3_gathered(cfg: dict, zero: dict, tp: int = 1, checkpointing: bool = True) -> dict[str, float]:
    """Weights (elements) ZeRO-3 holds gathered at most in each phase of the backward: "loss" (the
    LM head's forward and backward), "final_norm", "layer" (any layer's recompute and backward;
    layer 0's holds the embedding, prefetched for the last backward) and "embedding".

    DeepSpeed's parameter coordinator (partitioned_param_coordinator.py) replayed over the step's
    trace of module hooks as a Llama-style model makes it (_zero3_trace). Every module's hook is a
    fetch: its weights are gathered, then the trace's next weights are prefetched, up to
    stage3_prefetch_bucket_size at a time while fewer than stage3_max_live_parameters are gathered
    (the limit bounds prefetching only: a module's own weights come whatever is held), and a weight
    the prefetcher passes is kept until that use. After a module's forward or backward its weights
    are released unless the trace uses them within stage3_max_reuse_distance elements (DeepSpeed's
    default 1e9 keeps a model smaller than that whole). A checkpointed layer's recompute holds its
    weights for its backward. Weights of at most stage3_param_persistence_threshold elements are
    never released (model states)."""
    heads, kv, d = attention_shape(cfg)
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    persist = float(zero.get("stage3_param_persistence_threshold", 1e5))

    def gathered(x: float) -> float:
        return x if x > persist else 0.0

    layer = tuple(gathered(x) for x in (h, h * heads * d / tp, h * kv * d / tp, h * kv * d / tp, heads * d * h / tp,
                                        h, h * i / tp, h * i / tp, h * i / tp))  # fmt: skip
    trace = _zero3_trace(layer, gathered(cfg["vocab_size"] * h / tp), gathered(h), cfg["num_hidden_layers"],
                         bool(cfg.get("tie_word_embeddings")), checkpointing)  # fmt: skip
    limits = (float(zero.get("stage3_max_reuse_distance", 1e9)), float(zero.get("stage3_max_live_parameters", 1e9)),
              float(zero.get("stage3_prefetch_bucket_size", 5e7)))  # fmt: skip
    return dict(_replay(trace, *limits))


@functools.lru_cache(maxsize=16)
def _zero3_trace(layer, embed, norm, n_layers, tied, checkpointing) -> tuple[tuple[str, str, float, str], ...]:
    """(phase, module, elements, what) per hook of one step, in the order DeepSpeed sees them on a
    Llama-style model (printed from its coordinator, tests/plan/test_zero_buffers.py): what is
    "fetch" (a module about to run; containers too, with no weights of their own), "fetch+release"
    (a leaf that runs and is done) or "release" (a leaf whose backward is done)."""
    norm_in, q, k, v, o, norm_post, gate, up, down = layer
    head = ("embed", embed) if tied else ("head", embed)
    trace = [("forward", "", 0.0, "fetch"), ("forward", "model", 0.0, "fetch")]
    trace += [("forward", "embed", embed, "fetch+release"), ("forward", "rotary", 0.0, "fetch+release")]
    for n in range(n_layers):
        modules = [(f"{n}", 0.0, "fetch"), (f"{n}.in", norm_in, "fetch+release"), (f"{n}.attn", 0.0, "fetch")]
        modules += [(f"{n}.{x}", size, "fetch+release") for x, size in (("q", q), ("k", k), ("v", v), ("o", o))]
        modules += [(f"{n}.post", norm_post, "fetch+release"), (f"{n}.mlp", 0.0, "fetch")]
        modules += [(f"{n}.{x}", size, "fetch+release") for x, size in (("gate", gate), ("act", 0.0), ("up", up))]
        modules += [(f"{n}.down", down, "fetch+release")]
        trace += [("forward", *m) for m in modules]
    trace += [("forward", "norm", norm, "fetch+release"), ("loss", *head, "fetch+release")]
    trace += [("backward", "", 0.0, "fetch"), ("loss", *head, "fetch+release"), ("backward", "model", 0.0, "fetch")]
    trace += [("final_norm", "norm", norm, "fetch+release")]
    for n in reversed(range(n_layers)):
        trace += [
            ("layer", f"{n}", 0.0, "fetch"),
            ("layer", f"{n}.mlp", 0.0, "fetch"),
            ("layer", f"{n}.down", down, "fetch"),
        ]
        if checkpointing:  # the recompute's modules: fetched, kept for their backward
            recompute = [(f"{n}.in", norm_in), (f"{n}.attn", 0.0), (f"{n}.q", q), (f"{n}.k", k), (f"{n}.v", v),
                         (f"{n}.o", o), (f"{n}.post", norm_post), (f"{n}.mlp", 0.0), (f"{n}.gate", gate),
                         (f"{n}.act", 0.0), (f"{n}.up", up), (f"{n}.down", down)]  # fmt: skip
            trace += [("layer", name, size, "fetch") for name, size in recompute]
        trace += [("layer", f"{n}.down", down, "release")]
        backward = [(f"{n}.up", up), (f"{n}.act", 0.0), (f"{n}.gate", gate), (f"{n}.post", norm_post)]
        trace += [("layer", name, size, "fetch+release") for name, size in backward]
        trace += [("layer", f"{n}.attn", 0.0, "fetch")]
        backward = [(f"{n}.o", o), (f"{n}.v", v), (f"{n}.k", k), (f"{n}.q", q), (f"{n}.in", norm_in)]
        trace += [("layer", name, size, "fetch+release") for name, size in backward]
    trace.append(("embedding", "embed", embed, "fetch+release"))
    return tuple(trace)


@functools.lru_cache(maxsize=64)
def _replay(trace, reuse: float, live: float, prefetch: float) -> dict[str, float]:
    """The most weights gathered in each phase of the backward, over `trace`."""
    fetches = [e for e in trace if e[3] != "release"]  # one step each, DeepSpeed's __step_id
    queue = [(step, name, size) for step, (_, name, size, _) in enumerate(fetches) if size]  # its param trace
    gathered: dict[str, float] = {}
    wanted: dict[str, int] = {}  # the latest use the prefetcher (or a fetch) has taken from the queue
    peaks = {"loss": 0.0, "final_norm": 0.0, "layer": 0.0, "embedding": 0.0}
    step = head = 0  # the next fetch; the prefetcher's place in the queue
    for phase, name, size, what in trace:
        if what != "release":
            if size:
                gathered[name] = size
                while head < len(queue) and queue[head][0] <= step:  # this fetch's own entry
                    wanted[queue[head][1]] = max(wanted.get(queue[head][1], -1), queue[head][0])
                    head += 1
            budget, fetched = min(live - sum(gathered.values()), prefetch), 0.0
            while prefetch > 0 and head < len(queue) and fetched < budget:
                later_step, later, n = queue[head]
                wanted[later] = max(wanted.get(later, -1), later_step)
                if later not in gathered:
                    gathered[later] = n
                    fetched += n
                head += 1
            step += 1
            if phase in peaks:
                peaks[phase] = max(peaks[phase], sum(gathered.values()))
        if what == "fetch" or not size:
            continue
        # released, unless the prefetcher has passed a later use or the trace uses it within the distance
        keep, distance = wanted.get(name, -1) >= step, 0.0
        for _, later, n, _ in fetches[step:]:
            if keep or distance >= reuse:
                break
            keep = later == name
            distance += n
        if not keep:
            del gathered[name]
    return peaks


def fsdp2_buffers(cfg: dict, b: int) -> dict[Item, float]:
    """Bytes of FSDP2's buffers (train/fsdp2.py: fully_shard per decoder layer, then the model): in
    a layer's backward its weights gathered in the compute dtype (`b` bytes each), the next
    layer's prefetched beside them, and its whole gradient in the compute dtype and again in the
    float32 that the reduce-scatter takes (the previous layer's, kept in flight while this one
    computes); through the whole step the root's weights (embedding, LM head) gathered, which
    fully_shard does not reshard after the root's forward, and from the loss's backward on the LM
    head's whole gradient, reduced only with the root's at the end. With CPU offload the shards live
    on the host, and these are still gathered on the GPU. Read from FSDP2 on 2 ranks:
    tests/plan/test_fsdp2_buffers.py."""
    heads, kv, d = attention_shape(cfg)
    h = cfg["hidden_size"]
    layer = 2 * h * heads * d + 2 * h * kv * d + 3 * h * cfg["intermediate_size"]
    root = cfg["vocab_size"] * h * (1 if cfg.get("tie_word_embeddings") else 2)
    head = cfg["vocab_size"] * h
    return {Item.FSDP2_LAYER: layer * (2 * b + b + 4), Item.FSDP2_ROOT: root * b, Item.FSDP2_ROOT_GRADIENTS: head * b}


def kernel_scratch_bytes(s: Shapes, tokens: int, micro_batch: int, kernel: str) -> float:
    """Flash-attention backward's float32 dQ accumulator and, for grouped-query heads, dK and dV
    expanded to the query heads, for one call over the whole local block of one head group."""
    if kernel != "flash":
        return 0.0
    groups = head_groups((micro_batch, tokens // micro_batch, int(s.heads), s.d), max(1, int(s.kv / s.d)))
    expanded = 2 * s.q * s.b if s.kv < s.q else 0
    return tokens * (4 * s.q + expanded) / groups


@dataclass(frozen=True)
class Communicator:
    """A process group the step runs NCCL on: its members, and the peers a rank exchanges with
    point to point (the ring's neighbours; every other member of an all-to-all)."""

    name: str
    members: int
    peers: int = 0

    def nccl_bytes(self, env: Mapping[str, str] | None = None) -> float:
        """Per rank, under the NCCL environment `env` (None: this process's, with the trainer's defaults)."""
        if self.members < 2:
            return 0.0
        env = {**NCCL_DEFAULTS, **(os.environ if env is None else env)}
        scale = int(env.get("NCCL_BUFFSIZE", NCCL_DEFAULT_BUFFSIZE)) / NCCL_DEFAULT_BUFFSIZE
        collective = NCCL_COLLECTIVE_BYTES[min(self.members, 3)]
        nvls = NVLS_BYTES if self.members > 2 and env.get("NCCL_NVLS_ENABLE") != "0" else 0
        return (collective + self.peers * NCCL_P2P_BYTES_PER_PEER) * scale + nvls


def communicators(dims) -> tuple[Communicator, ...]:
    """The process groups a training step of the grid runs NCCL on (parallel/mesh.py): the world
    (DeepSpeed's collectives and the trainer's), the sequence group (the fingerprints' and the
    loss's collectives; the ring's sends to its two neighbours without Ulysses), with Ulysses its
    all-to-all group and the ring group, and the tensor-parallel group. A mesh group of the whole
    world is the default group (torch's DeviceMesh), one communicator with the world."""
    ring = dims.sp // dims.ulysses
    groups = [Communicator("world", dims.world)]
    if dims.ulysses > 1:
        groups += [
            Communicator("sequence", dims.sp),
            Communicator("Ulysses all-to-all", dims.ulysses, dims.ulysses - 1),
            Communicator("ring", ring, min(2, ring - 1)),
        ]
    else:
        groups.append(Communicator("sequence (ring)", dims.sp, min(2, dims.sp - 1)))
    if dims.tp > 1:
        groups.append(Communicator("tensor parallel", dims.tp))
    whole = [g for g in groups if g.members == dims.world]
    world = Communicator("world", dims.world, max(g.peers for g in whole))
    return (world, *(g for g in groups if g.members != dims.world))


def reserve_gib(
    tensors_gib: float, cuda: bool, groups: tuple[Communicator, ...] = (), scratch_bytes: float = 0.0
) -> dict[str, float]:
    """The reserve per process, by source: on a GPU for `tensors_gib` of planned tensors and the
    NCCL buffers of `groups`; on a CPU, the process's runtime."""
    if not cuda:
        return {"process runtime (CPU)": CPU_RUNTIME_GIB}
    return {
        "CUDA context and workspaces": CUDA_CONTEXT_GIB,
        "NCCL buffers": sum(g.nccl_bytes() for g in groups) / GIB,
        "attention kernel scratch": scratch_bytes / GIB,
        "fragmentation": FRAGMENTATION * tensors_gib,
    }


def reserve_for(
    cfg: dict, dims, tokens: int, micro_batch: int, b: int, cuda: bool, tensors_gib: float
) -> dict[str, float]:
    """The reserve per process of a step with `tokens` per rank on the grid `dims` (b: bytes per
    element), beside `tensors_gib` of planned tensors: reserve_gib with the grid's communicators and
    the attention kernel's scratch at that shape."""
    scratch = kernel_scratch_bytes(shapes(cfg, dims.tp, dims.ulysses, b), tokens, micro_batch, kernel_kind(b, cuda))
    return reserve_gib(tensors_gib, cuda, communicators(dims), scratch)
