"""The run's plan: what preflight validated, and its text form (`ringpatch plan`,
`make finetune-1m DRY_RUN=1`): the grid, the stages with tokens and memory per GPU, the launch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ringpatch.memory.estimate import estimate, host_offload_gib, parameters, total_gib
from ringpatch.memory.traffic import describe_traffic
from ringpatch.parallel import ParallelDims
from ringpatch.train.recipe import Recipe


@dataclass(frozen=True)
class Plan:
    """A recipe checked against the launched world, before any process group or download."""

    recipe: Recipe
    dims: ParallelDims
    cuda: bool
    bf16: bool
    ds_config: dict
    """The DeepSpeed config (ds_config.deepspeed_config), overlay merged."""
    model_config: dict | None
    """The architecture, when known without a download (recipe or local config.json)."""


def on_gpus(plan: Plan) -> Plan:
    """The plan as it trains on GPUs, wherever it is made: dtype auto is bf16 there."""
    return dataclasses.replace(plan, bf16=plan.recipe.model.dtype != "float32")


def _precision(dtype: str) -> str:
    return {"auto": "bf16 on GPU (fp32 on CPU)", "bfloat16": "bf16", "float32": "fp32"}[dtype]


def describe(plan, launch: str | None = None, gpus_per_node: int | None = None) -> str:
    """The plan as text: grid, stages with tokens per GPU and memory, and the launch command."""
    r, dims = plan.recipe, plan.dims
    lines = [
        f"recipe: model {r.model.name} ({r.model.init}), world {dims.world} = dp {dims.dp} x sp {dims.sp}"
        + (f" (ulysses {dims.ulysses} x ring {dims.ring})" if dims.ulysses > 1 else "")
        + f" x tp {dims.tp} (tp innermost), ZeRO-{r.zero.stage}{' + CPU offload' if r.zero.offload == 'cpu' else ''}, "
        f"{_precision(r.model.dtype)}, activation checkpointing {'on' if r.activation_checkpointing else 'off'}"
        + (" (layer inputs offloaded to host memory)" if r.activation_offload else "")
        + (", attention outputs kept for the recompute" if r.keep_attention else "")
        + (f", MLP over {r.mlp_tiles} sequence tiles" if r.mlp_tiles > 1 else "")
    ]
    masking = r.data is not None and r.data.document_masking
    lines.append(
        f"sequence: {r.parallel.layout} layout over sp (lengths a multiple of {dims.seq_len_divisor}), "
        + ("packed documents kept apart (document masking)" if masking else "packed documents see each other")
    )
    if plan.model_config:
        n, _ = parameters(plan.model_config)
        lines.append(f"parameters: {n / 1e9:.2f} B")
    lines.append("stage  seq_len    steps  micro_batch  tokens/GPU  rope                         est. GiB/GPU")
    for i, s in enumerate(r.stages):
        mb = s.micro_batch or r.micro_batch
        rope = (
            f"theta {s.rope_theta:,.0f}" if s.rope_theta else (str(s.rope_scaling) if s.rope_scaling else "as loaded")
        )
        est = estimate(r, plan.model_config, dims.world, s.seq_len, mb, plan.bf16) if plan.model_config else None
        mem = f"{total_gib(est):.1f}" if est else "unknown (no model config)"
        lines.append(
            f"{i:>5}  {s.seq_len:>7}  {s.steps:>7}  {mb:>11}  {mb * s.seq_len // dims.sp:>10}  {rope:<27}  {mem}"
        )
    if est:  # the last stage's
        lines.append("last stage, GiB/GPU: " + ", ".join(f"{k} {v:.2f}" for k, v in est.items()))
        last = r.stages[-1]
        host = host_offload_gib(r, plan.model_config, last.seq_len, last.micro_batch or r.micro_batch, plan.bf16)
        if host:
            per_node = f", {host * gpus_per_node:.1f} GiB per node of {gpus_per_node}" if gpus_per_node else ""
            lines.append(f"last stage, host memory for offloaded activations: {host:.2f} GiB per GPU{per_node}")
    if plan.model_config and gpus_per_node and dims.sp > 1:  # at the shortest stage: the least work per ring step
        first = min(r.stages, key=lambda s: s.seq_len)
        mb = first.micro_batch or r.micro_batch
        lines += describe_traffic(
            plan.model_config,
            dims.sp,
            dims.tp,
            dims.ulysses,
            mb * first.seq_len // dims.sp,
            r.activation_checkpointing,
            gpus_per_node,
            first.seq_len // dims.sp,
        )
    if launch:
        lines.append(f"launch: {launch}")
    return "\n".join(lines)


def max_context(
    plan: Plan, capacity_gib: float, host_gib_per_gpu: float | None = None, micro_batch: int = 1
) -> tuple[int, dict[str, float]] | None:
    """The longest sequence (a multiple of the layout's chunk count) whose estimate at
    `micro_batch` fits `capacity_gib` per GPU, and whose offloaded activations (if any) fit
    `host_gib_per_gpu` of host memory, with that estimate; None when not even the shortest fits
    or the architecture is unknown."""
    if plan.model_config is None:
        return None
    step = plan.dims.seq_len_divisor

    def fits(n: int):
        est = estimate(plan.recipe, plan.model_config, plan.dims.world, n * step, micro_batch, plan.bf16)
        host = host_offload_gib(plan.recipe, plan.model_config, n * step, micro_batch, plan.bf16)
        ok = total_gib(est) <= capacity_gib and (host_gib_per_gpu is None or host <= host_gib_per_gpu)
        return est if ok else None

    if not fits(1):
        return None
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:  # fits(low), not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low * step, fits(low)


def describe_max_context(plan: Plan, capacity_gib: float, gpus_per_node: int, host_gib_per_node: float) -> str:
    found = max_context(plan, capacity_gib, host_gib_per_node / gpus_per_node)
    world = f"{plan.dims.world} GPUs ({plan.dims.world // gpus_per_node} node(s) of {gpus_per_node})"
    if found is None:
        return f"max context: unknown (no model config) or not even {plan.dims.seq_len_divisor} tokens fit"
    seq_len, est = found
    items = ", ".join(f"{k} {v:.2f}" for k, v in sorted(est.items(), key=lambda kv: -kv[1])[:4])
    host = host_offload_gib(plan.recipe, plan.model_config, seq_len, 1, plan.bf16)
    host_line = (
        f"; host memory for offloaded activations {host:.1f} GiB per GPU, {host * gpus_per_node:.0f} of the "
        f"{host_gib_per_node:g} GiB per node allowed (--host-memory)"
        if host
        else ""
    )
    return (
        f"max context on {world} at {capacity_gib:g} GiB per GPU, micro_batch 1: {seq_len:,} tokens "
        f"({seq_len / 2**20:.2f} Mi), estimate {total_gib(est):.1f} GiB per GPU; largest: {items}{host_line}"
    )
