"""What the plan adds to the step's tensors: DeepSpeed's own buffers, which the simulated rank does
not run (arithmetic from the DeepSpeed config, its defaults where the config is silent), and a
reserve per process for what no tensor shows: on a GPU the CUDA context and workspaces, NCCL's
buffers per communicator, the attention kernels' scratch and fragmentation; on a CPU the
process's measured runtime (CPU_RUNTIME_GIB). Each item and its source: docs/memory.md.
"""

from __future__ import annotations

from ringpatch.attention.ring import head_groups
from ringpatch.memory.estimate import GIB, Shapes, attention_shape, parameters

CUDA_CONTEXT_GIB = 1.0
NCCL_GIB_PER_COMMUNICATOR = 0.25
FRAGMENTATION = 0.05
CPU_RUNTIME_GIB = 0.70
"""A CPU rank's resident memory besides the step's tensors, measured (docs/measurements.md): the
imported stack 0.43 GiB (torch 0.21, transformers 0.12, DeepSpeed 0.02, datasets 0.08); the built
trainer, what preparing the data leaves (modules, caches; its freed heap is returned) and the
allocator's pools after a few hundred steps, 0.25 more (the demo's preparing rank: 0.67 resident,
step peaks 0.716 with 0.035 of step tensors)."""


def zero_buffers(ds_config: dict | None, cfg: dict, b: int, tp: int = 1, cuda: bool = True) -> dict[str, float]:
    """Bytes of DeepSpeed's ZeRO buffers: held through the backward, and gathered weights in a
    layer's backward and in the loss's (stage 3). DeepSpeed allocates its gradient bucket whole,
    which a GPU's allocator holds; on a CPU only the pages a model's gradients touch are resident."""
    zero = (ds_config or {}).get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage == 0:
        return {"held": 0.0, "layer": 0.0, "loss": 0.0}
    bucket = float(zero.get("reduce_bucket_size", 5e8))
    if not cuda:
        bucket = min(bucket, float(parameters(cfg)[0]) / tp)
    overlap = zero.get("overlap_comm", stage == 3)
    held = bucket * b * (2 if overlap else 1) if zero.get("contiguous_gradients", True) else 0.0
    if stage < 3:
        return {"held": held, "layer": 0.0, "loss": 0.0}
    heads, kv, d = attention_shape(cfg)
    h = cfg["hidden_size"]
    layer = (2 * h * heads * d + 2 * h * kv * d + 3 * h * cfg["intermediate_size"]) / tp
    prefetch = min(float(zero.get("stage3_prefetch_bucket_size", 5e7)), layer)
    return {"held": held, "layer": (layer + prefetch) * b, "loss": cfg["vocab_size"] * h * b / tp}


def kernel_scratch_bytes(s: Shapes, tokens: int, micro_batch: int, kernel: str) -> float:
    """Flash-attention backward's float32 dQ accumulator and, for grouped-query heads, dK and dV
    expanded to the query heads, for one call over the whole local block of one head group."""
    if kernel != "flash":
        return 0.0
    groups = head_groups((micro_batch, tokens // micro_batch, int(s.heads), s.d), max(1, int(s.kv / s.d)))
    expanded = 2 * s.q * s.b if s.kv < s.q else 0
    return tokens * (4 * s.q + expanded) / groups


def reserve_gib(tensors_gib: float, cuda: bool, communicators: int = 3, scratch_bytes: float = 0.0) -> dict[str, float]:
    """The reserve per process, by source: on a GPU for `tensors_gib` of planned tensors and
    `communicators` NCCL communicators; on a CPU, the process's runtime."""
    if not cuda:
        return {"process runtime (CPU)": CPU_RUNTIME_GIB}
    return {
        "CUDA context and workspaces": CUDA_CONTEXT_GIB,
        "NCCL buffers": NCCL_GIB_PER_COMMUNICATOR * communicators,
        "attention kernel scratch": scratch_bytes / GIB,
        "fragmentation": FRAGMENTATION * tensors_gib,
    }
