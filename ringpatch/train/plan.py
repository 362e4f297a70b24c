"""The run's plan: what preflight validated, and its text form (`ringpatch plan`,
`make finetune-1m DRY_RUN=1`): the grid, the stages with tokens and memory per GPU, the launch."""

from __future__ import annotations

from dataclasses import dataclass

from ringpatch.memory.estimate import estimate, parameters
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
        est = estimate(r, plan.model_config, dims.world, s.seq_len, mb) if plan.model_config else None
        mem = f"{sum(est.values()):.1f}" if est else "unknown (no model config)"
        lines.append(
            f"{i:>5}  {s.seq_len:>7}  {s.steps:>7}  {mb:>11}  {mb * s.seq_len // dims.sp:>10}  {rope:<27}  {mem}"
        )
    if est:  # the last stage's
        lines.append("last stage, GiB/GPU: " + ", ".join(f"{k} {v:.2f}" for k, v in est.items()))
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
