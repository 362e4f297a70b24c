"""The run's plan: what preflight validated, and its text form (`ringpatch plan`,
`make finetune-1m DRY_RUN=1`): the grid, the stages with tokens and memory per GPU, the launch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ringpatch.attention.kernels import INDEX_EDGE
from ringpatch.data.prepare import data_line
from ringpatch.errors import BadValue
from ringpatch.hf.counts import forward_flops, parameters
from ringpatch.parallel import ParallelDims
from ringpatch.plan import switches
from ringpatch.plan.estimate import (
    GIB,
    kernel_call_elements,
    kernel_kind,
    layer_backward,
    layer_saved_bytes,
    model_states,
    norm_backward_bytes,
    shapes,
    total_gib,
)
from ringpatch.plan.items import Item, Kind, Phase
from ringpatch.plan.recipe import Recipe
from ringpatch.plan.reserve import fsdp2_buffers, reserve_for, zero_buffers
from ringpatch.plan.traffic import describe_traffic


@dataclass(frozen=True)
class Plan:
    """A recipe checked against the launched world, before any process group or download."""

    recipe: Recipe
    dims: ParallelDims
    cuda: bool
    bf16: bool
    ds_config: dict | None
    """The DeepSpeed config (ds_config.deepspeed_config), overlay merged; None with engine: fsdp2."""
    model_config: dict | None
    """The architecture, when known without a download (recipe or local config.json)."""

    def budget(self, stage: int | None = None) -> Budget:
        """A stage's memory per GPU (None: the longest stage)."""
        return stage_budget(self, longest_stage(self.recipe) if stage is None else stage)

    def max_context(self, gpu_memory: float, host_gib_per_gpu: float | None = None, micro_batch: int = 1) -> Context:
        """The longest sequence whose plan fits `gpu_memory` GiB per GPU (and the host memory)."""
        found = max_context(self, gpu_memory, host_gib_per_gpu, micro_batch)
        if found is None:
            raise BadValue(
                f"no context of {self.recipe.model.name} fits {gpu_memory:g} GiB per GPU on this grid, or its "
                "architecture is unknown without a download (set model.config in the recipe)"
            )
        return Context(*found)

    def simulate(self, stage: int | None = None, rank: int = 0):
        """The simulated rank (plan/simulate.py) of a stage (None: the longest)."""
        from ringpatch.plan.simulate import simulate

        return simulate(self, stage, rank, kernel="cuda" if self.cuda else "cpu")


@dataclass(frozen=True)
class Context:
    seq_len: int
    budget: Budget


def longest_stage(recipe) -> int:
    """The index of the recipe's longest stage."""
    return max(range(len(recipe.stages)), key=lambda i: recipe.stages[i].seq_len)


@dataclass(frozen=True)
class Budget:
    """A stage's memory per GPU: the step's tensors and DeepSpeed's buffers (items, GiB, as
    estimate gives them) and the reserve for what no tensor shows."""

    items: dict[Item, float]
    reserve: dict[str, float]
    host: float
    """GiB of host memory for offloaded activations."""

    @property
    def tensors(self) -> float:
        return total_gib(self.items)

    @property
    def total(self) -> float:
        return self.tensors + sum(self.reserve.values())


def estimate(
    recipe,
    cfg: dict,
    world: int,
    seq_len: int,
    micro_batch: int,
    bf16: bool = True,
    cuda: bool = True,
    buffers: dict[Item, float] | None = None,
) -> dict[Item, float]:
    """GiB per GPU, by item, for one stage: plan/estimate.py's arithmetic, with the items each
    switch holds through the step from its module. bf16: the training precision (False: float32);
    cuda: a GPU run (False: a CPU run, whose kernel is the CPU's and whose gradient buffers are
    memory only once the layers' backward writes them); buffers: the engine's buffers in bytes, by
    item (engine_buffers; None: the step's tensors only, which is what the simulated rank holds)."""
    b = 2 if bf16 else 4
    sp, tp, ulysses = recipe.parallel.sp, recipe.parallel.tp, recipe.parallel.ulysses
    s = shapes(cfg, tp, ulysses, b)
    tokens = micro_batch * seq_len // sp  # per GPU
    checkpointing = recipe.activation_checkpointing
    chunked = recipe.rmsnorm == "chunked"
    phases = layer_backward(s, tokens, micro_batch, sp, ulysses, switches.layer_flags(recipe, kernel_kind(b, cuda)))
    if (
        not checkpointing
    ):  # the layer's saved tensors are already held (the switch's item); its backward adds its working set
        # (the phases count a layer's tensors but its input, which a checkpoint would hold)
        saved = layer_saved_bytes(cfg, tp, b, chunked_norm=chunked, ulysses=ulysses) - (s.b * s.h if chunked else 0)
        phases = {k: v - tokens * saved for k, v in phases.items()}
    phase = max(phases, key=phases.get)
    # a tied LM head's gradient waits in autograd for the input embedding's, at the very end: it is
    # held through the final norm's and every layer's backward
    waiting = cfg["vocab_size"] * s.h * s.b / tp if cfg.get("tie_word_embeddings") else 0
    items = {
        **model_states(recipe, cfg, world, b, cuda, switches.state_flags(recipe, cuda)),
        # the switches' own items (checkpointed layer inputs, kept attention outputs, the loss chunk)
        **{k: v for sw in switches.SWITCHES for k, v in sw.plan_bytes(recipe, cfg, s, tokens).items()},
        phase: phases[phase] + waiting,
        # the final norm's backward beside its input and the gradient coming in
        Item.FINAL_NORM_BACKWARD: norm_backward_bytes(s, tokens, chunked)
        + tokens * s.b * s.h * (1 + chunked)
        + waiting,
    }
    # the input embedding's backward, the step's last: its dense (vocab x hidden) gradient and, tied,
    # the LM head's that waited for it and their sum (autograd adds out of place), with the gradient
    # coming in; every layer's held tensors are freed by then, so the item is what it adds beyond them
    embedding = cfg["vocab_size"] * s.h * s.b / tp * (3 if waiting else 1) + tokens * s.b * s.h
    freed = sum(v for k, v in items.items() if k.phase is Phase.STEP and k.kind is Kind.ACTIVATION)
    if embedding > freed:
        items[Item.EMBEDDING_BACKWARD] = embedding - freed
    host = sum(sw.host_bytes(recipe, cfg, tokens, b) for sw in switches.SWITCHES)
    if host and not cuda:  # one memory on a CPU run
        items[Item.OFFLOADED] = host
    items |= {k: v for k, v in (buffers or {}).items() if v}
    return {k: v / GIB for k, v in items.items()}


def engine_buffers(plan: Plan, b: int) -> dict[Item, float]:
    """Bytes of the engine's own buffers by item: FSDP2's (reserve.fsdp2_buffers), or DeepSpeed's
    from its config (reserve.zero_buffers)."""
    if plan.recipe.engine == "fsdp2":
        return fsdp2_buffers(plan.model_config, b)
    checkpointing = plan.recipe.activation_checkpointing
    zero = zero_buffers(plan.ds_config, plan.model_config, b, plan.dims.tp, plan.cuda, checkpointing)
    buckets = Item.ZERO_BUCKETS if plan.cuda else Item.ZERO_BUCKETS_AS_FILLED
    return {buckets: zero["held"]} | {item: zero[phase] for phase, item in GATHERED.items() if phase in zero}


GATHERED = {"loss": Item.LOSS_GATHERED, "final_norm": Item.FINAL_NORM_GATHERED, "layer": Item.LAYER_GATHERED,
            "embedding": Item.EMBEDDING_GATHERED}  # fmt: skip
"""reserve.zero3_gathered's phases, as plan items."""


def host_offload_gib(recipe, cfg: dict, seq_len: int, micro_batch: int, bf16: bool = True) -> float:
    """Host GiB per GPU that the switches hold (activation_offload's layer inputs; 0 when off)."""
    tokens = micro_batch * seq_len // recipe.parallel.sp
    return sum(sw.host_bytes(recipe, cfg, tokens, 2 if bf16 else 4) for sw in switches.SWITCHES) / GIB


def budget(plan: Plan, seq_len: int, micro_batch: int) -> Budget:
    """The plan's memory per GPU for sequences of `seq_len` at `micro_batch` (needs model_config)."""
    r, cfg, dims = plan.recipe, plan.model_config, plan.dims
    b = 2 if plan.bf16 else 4
    buffers = engine_buffers(plan, b)
    items = estimate(r, cfg, dims.world, seq_len, micro_batch, plan.bf16, plan.cuda, buffers=buffers)
    tokens = micro_batch * seq_len // dims.sp
    reserve = reserve_for(cfg, dims, tokens, micro_batch, b, plan.cuda, total_gib(items))
    return Budget(items, reserve, host_offload_gib(r, cfg, seq_len, micro_batch, plan.bf16))


def stage_budget(plan: Plan, index: int) -> Budget:
    s = plan.recipe.stages[index]
    return budget(plan, s.seq_len, s.micro_batch or plan.recipe.micro_batch)


def step_flops(plan: Plan, index: int) -> float | None:
    """Model FLOPs of one optimizer step of stage `index`, per GPU (None: no model config): the
    forward and backward (3x the forward) of every matmul, lm_head included, and of causal
    attention over the whole sequence, QK^T and AV at half; recompute is not counted (MFU's
    convention). Packed documents kept apart do less attention than this counts."""
    cfg = plan.model_config
    if cfg is None:
        return None
    r, dims, stage = plan.recipe, plan.dims, plan.recipe.stages[index]
    forward = forward_flops(cfg, stage.seq_len)
    sequences = dims.dp * (stage.micro_batch or r.micro_batch) * r.grad_accum
    return 3 * forward * sequences / dims.world


def on_device(plan: Plan, device: str) -> Plan:
    """The plan as it trains on `device` ("cuda" or "cpu"), wherever it is made: dtype auto is bf16
    on GPUs and float32 on CPUs (the trainer's rule)."""
    if device == "cuda":
        return dataclasses.replace(plan, bf16=plan.recipe.model.dtype != "float32", cuda=True)
    return dataclasses.replace(plan, bf16=plan.recipe.model.dtype == "bfloat16", cuda=False)


def unit(plan: Plan) -> str:
    """What one rank is: a GPU, or a CPU process."""
    return "GPU" if plan.cuda else "process"


def _precision(dtype: str) -> str:
    return {"auto": "bf16 on GPU (fp32 on CPU)", "bfloat16": "bf16", "float32": "fp32"}[dtype]


def describe(plan, launch: str | None = None, gpus_per_node: int | None = None) -> str:
    """The plan as text: grid, stages with tokens per GPU and memory, and the launch command."""
    r, dims, per = plan.recipe, plan.dims, unit(plan)
    lines = [
        f"recipe: model {r.model.name} ({r.model.init}), world {dims.world} = dp {dims.dp} x sp {dims.sp}"
        + (f" (ulysses {dims.ulysses} x ring {dims.ring})" if dims.ulysses > 1 else "")
        + f" x tp {dims.tp} (tp innermost), {'FSDP2' if r.engine == 'fsdp2' else f'ZeRO-{r.zero.stage}'}, "
        f"{_precision(r.model.dtype)}" + switches.plan_words(r)
    ]
    masking = r.data is not None and r.data.document_masking
    lines.append(
        f"sequence: {r.parallel.layout} layout over sp (lengths a multiple of {dims.seq_len_divisor}), "
        + ("packed documents kept apart (document masking)" if masking else "packed documents see each other")
    )
    if r.data is not None:
        lines.append(data_line(r.data))
    if plan.model_config:
        n, _ = parameters(plan.model_config)
        lines.append(f"parameters: {n / 1e9:.2f} B")
    lines.append(
        f"stage  seq_len    steps  micro_batch  {'tokens/' + per:>10}  {'TFLOP/' + per + '/step':>14}  rope"
        f"                         GiB/{per} planned + reserve"
    )
    last = None
    for i, s in enumerate(r.stages):
        mb = s.micro_batch or r.micro_batch
        rope = (
            f"theta {s.rope_theta:,.0f}" if s.rope_theta else (str(s.rope_scaling) if s.rope_scaling else "as loaded")
        )
        last = stage_budget(plan, i) if plan.model_config else None
        mem = (
            f"{last.tensors:.1f} + {sum(last.reserve.values()):.1f} = {last.total:.1f}"
            if last
            else "unknown (no model config)"
        )
        flops = step_flops(plan, i)
        tflop = f"{flops / 1e12:>14,.1f}" if flops is not None else f"{'?':>14}"
        lines.append(
            f"{i:>5}  {s.seq_len:>7}  {s.steps:>7}  {mb:>11}  {mb * s.seq_len // dims.sp:>10}  {tflop}  {rope:<27}  {mem}"
        )
    if last:
        lines.append(f"last stage, planned GiB/{per}: " + ", ".join(f"{k} {v:.2f}" for k, v in last.items.items()))
        lines.append(f"last stage, reserve GiB/{per}: " + ", ".join(f"{k} {v:.2f}" for k, v in last.reserve.items()))
        if last.host:
            per_node = f", {last.host * gpus_per_node:.1f} GiB per node of {gpus_per_node}" if gpus_per_node else ""
            lines.append(f"last stage, host memory for offloaded activations: {last.host:.2f} GiB per GPU{per_node}")
    if plan.cuda and plan.model_config and gpus_per_node and dims.sp > 1:  # the shortest stage: least work per step
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


def index_elements(plan: Plan, seq_len: int, micro_batch: int = 1) -> int | None:
    """Elements of the largest query tensor one attention kernel call takes at `seq_len`, on a GPU
    run (whose kernels index with 32-bit integers up to INDEX_EDGE); None on CPU processes."""
    if not plan.cuda:
        return None
    s = shapes(plan.model_config, plan.dims.tp, plan.dims.ulysses, 2 if plan.bf16 else 4)
    return kernel_call_elements(s, micro_batch * seq_len // plan.dims.sp, micro_batch, plan.dims.ulysses)


def index_limit(plan: Plan, micro_batch: int = 1) -> int | None:
    """The longest sequence (a multiple of the layout's chunk count) whose attention kernel calls
    stay under INDEX_EDGE at `micro_batch`; None on CPU processes, whose kernel has no edge. Near
    the edge every K/V head is its own group, so the elements grow with the length from there."""
    if not plan.cuda:
        return None
    step = plan.dims.seq_len_divisor

    def under(n: int) -> bool:
        return index_elements(plan, n * step, micro_batch) < INDEX_EDGE

    low, high = 0, 1
    while under(high):
        low, high = high, high * 2
    while high - low > 1:  # under(low) (or low 0), not under(high)
        mid = (low + high) // 2
        low, high = (mid, high) if under(mid) else (low, mid)
    return low * step


def max_context(
    plan: Plan, capacity_gib: float, host_gib_per_gpu: float | None = None, micro_batch: int = 1
) -> tuple[int, Budget] | None:
    """The longest sequence (a multiple of the layout's chunk count) whose planned tensors and
    reserve at `micro_batch` fit `capacity_gib` per GPU, whose offloaded activations (if any)
    fit `host_gib_per_gpu` of host memory, and whose attention kernel calls stay under the index
    edge, with its budget; None when not even the shortest fits or the architecture is unknown."""
    if plan.model_config is None:
        return None
    step = plan.dims.seq_len_divisor
    edge = index_limit(plan, micro_batch)

    def fits(n: int):
        if edge is not None and n * step > edge:
            return None
        found = budget(plan, n * step, micro_batch)
        ok = found.total <= capacity_gib and (host_gib_per_gpu is None or found.host <= host_gib_per_gpu)
        return found if ok else None

    if not fits(1):
        return None
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:  # fits(low), not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low * step, fits(low)


def limit_of(plan: Plan, seq_len: int, capacity_gib: float, host_gib_per_gpu: float | None) -> str:
    """What stops a sequence of `seq_len` (the first length past the longest that fits): the GPU's
    memory, the host's for offloaded activations, or both, with the figures."""
    found = budget(plan, seq_len, 1)
    reasons = []
    if found.total > capacity_gib:
        reasons.append(f"GPU memory ({found.total:.3f} GiB per GPU planned with reserve, of {capacity_gib:g})")
    if host_gib_per_gpu is not None and found.host > host_gib_per_gpu:
        reasons.append(
            f"host memory for offloaded activations ({found.host:.3f} GiB per GPU, of the {host_gib_per_gpu:.3f} "
            "allowed)"
        )
    elements = index_elements(plan, seq_len)
    if elements is not None and elements >= INDEX_EDGE:
        reasons.append(
            f"the index edge (one attention kernel call would take {elements:,} elements, past 2^31, where the "
            "GPU kernels index with 32-bit integers)"
        )
    return " and ".join(reasons) or "nothing (it fits)"


def describe_max_context(plan: Plan, capacity_gib: float, gpus_per_node: int, host_gib_per_node: float) -> str:
    found = max_context(plan, capacity_gib, host_gib_per_node / gpus_per_node)
    world = f"{plan.dims.world} GPUs ({plan.dims.world // gpus_per_node} node(s) of {gpus_per_node})"
    if found is None:
        return f"max context: unknown (no model config) or not even {plan.dims.seq_len_divisor} tokens fit"
    seq_len, best = found
    items = ", ".join(f"{k} {v:.2f}" for k, v in sorted(best.items.items(), key=lambda kv: -kv[1])[:4])
    host_line = (
        f"; host memory for offloaded activations {best.host:.1f} GiB per GPU, {best.host * gpus_per_node:.0f} of "
        f"the {host_gib_per_node:g} GiB per node allowed (--host-memory)"
        if best.host
        else ""
    )
    stop = limit_of(plan, seq_len + plan.dims.seq_len_divisor, capacity_gib, host_gib_per_node / gpus_per_node)
    elements = index_elements(plan, seq_len)
    index = (
        f"; the largest attention kernel call takes {elements:,} elements, under the 2^31 where the GPU kernels "
        "index with 32-bit integers"
        if elements is not None
        else ""
    )
    return (
        f"max context on {world} at {capacity_gib:g} GiB per GPU, micro_batch 1: {seq_len:,} tokens "
        f"({seq_len / 2**20:.2f} Mi), planned {best.tensors:.1f} GiB per GPU + reserve {sum(best.reserve.values()):.1f}; "
        f"largest: {items}{host_line}; the next length is stopped by {stop}{index}"
    )
