"""A simulated rank: one training step of a recipe's stage at its real shape, with no GPU.

One rank of the recipe's grid runs the trainer's own code (load_lm's architecture, prepare_lm's
checkpointing, offload, kept attention, tiled MLP and patch_model, local_batch's shard_batch, the
chunked loss, forward and backward) on fake tensors (FakeTensorMode: shapes and dtypes, no data)
over torch's `fake` process group of the recipe's world size, whose collectives and P2P complete at
once. The ring's kernel calls are those of the CUDA kernel module (kernels/torch_cuda.py), made on
fake CPU tensors: fake CUDA tensors cannot run backward without a GPU. Small bookkeeping tensors
(positions, the checks' rows) stay real, so every check runs on values (tracker.FakeLarge).

Counted (plan/tracker.py): every storage the step allocates and frees, by category, on the
device and on the host (offloaded activations); the FLOPs (FlopCounterMode, causal calls at half);
every read of tensor data into Python (a host sync on a GPU), by call site. ZeRO's partitioning of
weights, gradients and optimizer state stays arithmetic (DeepSpeed does not run on fake tensors):
plan/estimate.py's items, added to the simulated activations and working memory. Parameter
gradients are dropped as they are made, as ZeRO-2/3 reduce them into partitions.

`ringpatch plan --simulate` prints it; tests/plan/test_simulate.py holds it to a real run on CPU.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ringpatch import regions
from ringpatch.attention.kernels import TorchCPU, TorchCUDA
from ringpatch.errors import BadValue, Unsupported
from ringpatch.hf.models import GATED_MLP_MODEL_TYPES
from ringpatch.plan.budget import Budget, Plan, estimate, longest_stage
from ringpatch.plan.estimate import GIB, total_gib
from ringpatch.plan.items import Item, Kind
from ringpatch.plan.tracker import StorageTracker, SyncCounter
from ringpatch.regions import Region

SIMULATED_MODEL_TYPES = GATED_MLP_MODEL_TYPES
"""Model types whose layers the simulator has been checked on (tests/plan/test_simulate.py)."""


class SimulatedCUDA(TorchCUDA):
    """The CUDA kernel module's calls on fake CPU tensors, as on a GPU of compute capability 8.0 or
    newer (flash for bf16/fp16 full and causal calls, memory-efficient for band and float32 calls)."""

    def __init__(self):
        self.calls: Counter = Counter()
        """Kernel calls made, "forward" (recomputes included) and "backward": launches on a GPU."""

    def check(self, q: torch.Tensor) -> None:
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise BadValue(f"the CUDA kernels take float16, bfloat16 or float32, got {q.dtype}")

    def forward_one(self, *args):
        self.calls["forward"] += 1
        return super().forward_one(*args)

    def forward_varlen(self, *args):
        self.calls["forward"] += 1
        return super().forward_varlen(*args)

    def backward_one(self, *args):
        self.calls["backward"] += 1
        return super().backward_one(*args)

    def backward_varlen(self, *args):
        self.calls["backward"] += 1
        return super().backward_varlen(*args)


@dataclass
class Simulation:
    stage: int
    seq_len: int
    micro_batch: int
    tokens: int
    """Tokens per rank."""
    model_states: dict[Item, float]
    """GiB per rank, arithmetic (ZeRO): weights, gradients, optimizer."""
    peak: dict[str, float]
    """GiB live at the device's peak of activations and working memory, by category."""
    host: dict[str, float]
    """GiB of host memory at its peak (offloaded activations), by category."""
    flops: int
    syncs: Counter = field(default_factory=Counter)
    """Reads of device data into Python in the step, by call site (each a host sync on a GPU)."""
    seconds: float = 0.0
    largest_numel: int = 0
    """Elements of the largest tensor the step made (a 32-bit index overflows from 2**31)."""
    total_peak: float = 0.0
    """GiB: the peak of device and host together (one memory on a CPU run)."""
    kernel_calls: Counter = field(default_factory=Counter)
    """The attention kernel calls of the step ("forward", recomputes included, and "backward"), all
    layers, all head groups: with the CUDA module, what a GPU launches."""
    largest: list = field(default_factory=list)
    """The largest storages live at the device's peak: (GiB, category, shape and dtype)."""
    kernel: str = "cuda"
    """Whose kernel calls ran: "cuda" (the CUDA module's, what a GPU runs) or "cpu"."""

    @property
    def total_gib(self) -> float:
        """The device peak: model states plus the step's simulated peak."""
        return sum(self.model_states.values()) + sum(self.peak.values())


def check_simulable(plan: Plan) -> None:
    """One line naming what the simulator cannot run, before any work."""
    cfg = plan.model_config
    if cfg is None:
        raise BadValue(
            f"--simulate needs the architecture of {plan.recipe.model.name} without a download: set model.config "
            "in the recipe, or use a local folder or a model in the Hugging Face cache"
        )
    if cfg.get("model_type") not in SIMULATED_MODEL_TYPES:
        raise Unsupported(
            f"--simulate runs {', '.join(SIMULATED_MODEL_TYPES)} layers; {plan.recipe.model.name} is "
            f"{cfg.get('model_type')!r}: use `ringpatch plan` without --simulate for the arithmetic estimate"
        )
    if plan.recipe.parallel.tp > 1:
        raise Unsupported(
            f"--simulate runs tp = 1 (AutoTP shards the model inside DeepSpeed, which does not run on fake tensors); "
            f"this recipe has parallel.tp {plan.recipe.parallel.tp}: use `ringpatch plan` without --simulate"
        )


@contextlib.contextmanager
def fake_world(world: int, rank: int = 0):
    """torch's `fake` process group of `world` ranks, as rank `rank`: collectives complete at once
    (all_gather copies this rank's input to every slot, as if every rank held the same)."""
    if dist.is_initialized():
        raise RuntimeError("--simulate starts its own fake process group; run it outside a launched job")
    import torch.testing._internal.distributed.fake_pg  # noqa: F401 (registers the `fake` backend)

    dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


class Scope:
    """What the step is doing when a storage appears: forward or backward, inside the final norm,
    and in backward the part last entered (the loss's chunks, or a layer's recompute)."""

    def __init__(self, recipe, lm):
        self.checkpointing = recipe.activation_checkpointing
        self.keep = recipe.keep_attention
        self.final_norm = False
        self.backward_part = "loss chunk"  # backward starts at the loss
        self.tracker: StorageTracker | None = None
        decoder = lm.get_decoder()
        self.norm, self.layers = decoder.norm, list(decoder.layers)
        # a layer's own forward, under any wrapper (transformers checkpoints `forward`, so a recompute
        # in backward runs it without the module's hooks)
        self.layer_codes = {inspect.unwrap(type(layer).forward).__code__ for layer in self.layers}

    def label(self) -> tuple[str, str]:
        """(place, category): the innermost code region open (ringpatch/regions.py), else the scope."""
        region = regions.current()
        if torch._C._current_graph_task_id() == -1:  # forward
            if region is Region.OFFLOAD:
                return "host", str(region)
            if region is not None:
                return "device", str(region)
            if self.final_norm:
                return "device", "final norm"
            return "device", "checkpointed activations" if self.checkpointing else "layer activations"
        if region is Region.LOSS or self._in_layer():
            self.backward_part = str(Region.LOSS) if region is Region.LOSS else "recomputed layer"
        return "device", str(region) if region not in (None, Region.OFFLOAD) else self.backward_part

    def _in_layer(self) -> bool:
        frame = sys._getframe(3)
        while frame is not None:
            if frame.f_code in self.layer_codes:
                return True
            frame = frame.f_back
        return False

    def hook(self) -> list:
        """Module hooks: the final norm's scope, and each layer's forward, which relabels what the
        layer leaves alive (its output, or with keep_attention its kept attention output)."""
        handles = [
            self.norm.register_forward_pre_hook(lambda *_: setattr(self, "final_norm", True)),
            self.norm.register_forward_hook(lambda *_: setattr(self, "final_norm", False)),
        ]
        for layer in self.layers:
            handles.append(layer.register_forward_pre_hook(self._enter))
            handles.append(layer.register_forward_hook(self._leave))
        return handles

    def _enter(self, module, args):
        module._ringpatch_events = self.tracker.events

    def _leave(self, module, args, output):
        if torch._C._current_graph_task_id() != -1:
            return
        saved = "checkpointed activations" if self.checkpointing else "layer activations"
        since = module._ringpatch_events
        if self.keep:  # the ring's output and lse, kept for the recompute
            self.tracker.relabel(since, "kept attention outputs", keep=lambda c: c == "ring buffers")
        self.tracker.relabel(since, saved, keep=lambda c: c != "kept attention outputs")


def _answer(name: str, tensors, site: str):
    """A read of a fake tensor (device data the simulation does not have) in the step: a check's
    result (equal, bool) passes, as every simulated rank holds the same; a value is 1."""
    if name == "tolist":
        raise Unsupported(f"the step reads a whole device tensor into Python at {site}; the simulator has no values")
    return True if name in ("equal", "__bool__") else 1


SUSTAINED_FLOPS = 0.4 * 989e12
"""The step-time estimate's rate: 40% of an H100 SXM's dense bf16 peak (989 TFLOP/s), about what
long-context training sustains (ALST reports 34-45% MFU for Llama-3-8B at 500K-3.7M tokens)."""


def describe_simulation(sim: Simulation, planned: Budget, world: int, capacity_gib: float | None = None) -> str:
    """The simulated rank beside the plan, per GPU: model states, the step's tensors, DeepSpeed's
    buffers, the reserve, and what was live at the simulated peak."""
    states = sum(sim.model_states.values())
    per = "GPU" if sim.kernel == "cuda" else "process"
    kernels = "the CUDA kernels' calls" if sim.kernel == "cuda" else "the CPU kernel's calls"
    tensors = total_gib({k: v for k, v in planned.items.items() if k.kind is not Kind.DEEPSPEED})
    ds = planned.tensors - tensors  # DeepSpeed's buffers, where they add to the peak
    steps_tensors = tensors - states
    simulated = sum(sim.peak.values())
    reserve = sum(planned.reserve.values())
    sim_total = states + simulated + ds + reserve
    top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(sim.peak.items(), key=lambda kv: -kv[1]) if v >= 0.005)
    lines = [
        f"simulated rank 0 of {world}, stages[{sim.stage}] (seq_len {sim.seq_len:,}, micro_batch {sim.micro_batch}, "
        f"{sim.tokens:,} tokens per {per}): {kernels} on fake tensors, {sim.seconds:.0f} s",
        f"  GiB per {per:<20}planned  simulated",
        f"  model states (ZeRO)        {states:8.2f}  {states:9.2f}   arithmetic in both",
        f"  the step's tensors         {steps_tensors:8.2f}  {simulated:9.2f}   planned/simulated "
        f"{(states + steps_tensors) / (states + simulated):.3f} with the model states",
        f"  the engine's buffers       {ds:8.2f}  {ds:9.2f}   arithmetic (DeepSpeed's config, or FSDP2's layers)",
        f"  reserve                    {reserve:8.2f}  {reserve:9.2f}   "
        + ", ".join(f"{k} {v:.2f}" for k, v in planned.reserve.items()),
        f"  total                      {planned.total:8.2f}  {sim_total:9.2f}",
        f"  live at the simulated peak: {top}",
        "  largest tensors there: " + "; ".join(f"{what} {c} {gib:.2f}" for gib, c, what in sim.largest[:6]),
    ]
    if sim.host:
        lines.append("  host at its peak: " + ", ".join(f"{k} {v:.2f}" for k, v in sim.host.items()) + " GiB per GPU")
    syncs = ", ".join(f"{site.rsplit('/', 1)[-1]} x{n}" for site, n in sim.syncs.most_common())
    time = (
        f", about {sim.flops / SUSTAINED_FLOPS:.0f} s at {SUSTAINED_FLOPS / 1e12:.0f} TFLOP/s (40% of an H100's 989 bf16 "
        "dense)"
        if sim.kernel == "cuda"
        else ""
    )
    lines += [
        f"  step: {sim.flops:.3g} FLOPs per {per} (forward, recompute, backward){time}",
        f"  host syncs in the step's forward and backward: {sum(sim.syncs.values())} ({syncs or 'none'})",
    ]
    if sim.kernel_calls:
        lines.append(
            f"  attention kernel calls in the step: {sim.kernel_calls['forward']:,} forward (recomputes included), "
            f"{sim.kernel_calls['backward']:,} backward"
        )
    if capacity_gib is not None and sim_total > capacity_gib:
        raise BadValue(
            f"the simulated rank needs {sim_total:.1f} GiB per GPU at stages[{sim.stage}] (seq_len {sim.seq_len}), "
            f"more than the {capacity_gib:g} GiB allowed (--gpu-memory). Live at its peak: {top}; with model states "
            f"{states:.1f}, the engine's buffers {ds:.1f} and reserve {reserve:.1f}"
        )
    return "\n".join(lines)


def step_batch(plan: Plan, mesh, stage: int, documents: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
    """This rank's part of a stage's batch, as the trainer builds it (local_batch) from full rows
    of one document each (the ring's most work), or of packed documents of these lengths."""
    from ringpatch.plan.model import local_batch

    s = plan.recipe.stages[stage]
    micro_batch = s.micro_batch or plan.recipe.micro_batch
    ids = torch.zeros(micro_batch, s.seq_len, dtype=torch.long)
    lengths = documents or (s.seq_len,)
    if sum(lengths) != s.seq_len:
        raise BadValue(f"the documents' lengths add up to {sum(lengths)}, not the stage's seq_len {s.seq_len}")
    positions = torch.cat([torch.arange(n) for n in lengths])
    rows = {"input_ids": ids, "doc_position_ids": positions.expand(micro_batch, s.seq_len)}
    return local_batch(rows, plan.recipe, mesh)


def drop_when_whole(p) -> None:
    """A post-accumulate-grad hook: the parameter's gradient leaves once it is whole, as ZeRO
    reduces it into a partition (a tiled MLP's weights wait for the last tile: ds_grad_is_ready)."""
    if getattr(p, "ds_grad_is_ready", True):
        p.grad = None


def step_model(plan: Plan, lm, mesh, backend="auto"):
    """The trainer's model around `lm` (prepare_lm, LossModel), in training mode, its parameter
    gradients dropped as they are made: ZeRO takes each into its partition (counted by the estimate),
    once the gradient is whole: a tiled MLP's weights accumulate theirs over the tiles, full size,
    until the last (TiledMLP sets ds_grad_is_ready, which ZeRO's reduction waits for)."""
    from ringpatch.plan.model import LossModel, prepare_lm

    model = LossModel(prepare_lm(plan, lm, mesh, backend=backend), chunk_tokens=plan.recipe.loss_chunk_tokens)
    model.train()
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(drop_when_whole)
    return model


def counted_step(plan: Plan, model, local: dict, fake_mode=None) -> tuple[StorageTracker, SyncCounter]:
    """Forward and backward of `model` on `local`, counted: storages by category, FLOPs, host syncs."""
    scope = Scope(plan.recipe, model.lm)
    handles = scope.hook()
    syncs = SyncCounter(answer=_answer if fake_mode is not None else None)
    tracker = scope.tracker = StorageTracker(scope.label, count_flops=True, fake_mode=fake_mode, syncs=syncs)
    try:
        with tracker, syncs:
            model(**local).backward()
    finally:
        for h in handles:
            h.remove()
    return tracker, syncs


def simulate(
    plan: Plan, stage: int | None = None, rank: int = 0, kernel: str = "cuda", documents: tuple[int, ...] | None = None
) -> Simulation:
    """Simulate one step of `stage` (None: the longest) on `rank` of the plan's grid.
    kernel "cuda": the CUDA kernel module's calls (what a GPU runs); "cpu": the CPU kernel (what a
    CPU run does, for holding the simulator to one). documents: the lengths of the documents packed
    in each row (None: one document a row)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ringpatch.memory.offload import plain_host_copies
    from ringpatch.parallel import build_mesh
    from ringpatch.plan.model import lm_from_config

    check_simulable(plan)
    recipe = plan.recipe
    stage = longest_stage(recipe) if stage is None else stage
    s = recipe.stages[stage]
    micro_batch = s.micro_batch or recipe.micro_batch
    started = time.perf_counter()
    with fake_world(plan.dims.world, rank), plain_host_copies():
        mesh = build_mesh(plan.dims, "cpu")
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        with fake:
            lm = lm_from_config(plan.model_config, plan.bf16)
        backend = SimulatedCUDA() if kernel == "cuda" else TorchCPU()
        model = step_model(plan, lm, mesh, backend=backend)
        tracker, syncs = counted_step(plan, model, step_batch(plan, mesh, stage, documents), fake_mode=fake)
    states = estimate(recipe, plan.model_config, plan.dims.world, s.seq_len, micro_batch, plan.bf16)
    return Simulation(
        stage=stage,
        seq_len=s.seq_len,
        micro_batch=micro_batch,
        tokens=micro_batch * s.seq_len // plan.dims.sp,
        model_states={k: v for k, v in states.items() if k.kind is Kind.MODEL_STATE},
        peak={k: v / GIB for k, v in tracker.at_peak.get("device", Counter()).items()},
        host={k: v / GIB for k, v in tracker.at_peak.get("host", Counter()).items()},
        flops=tracker.flops,
        syncs=syncs.sites,
        seconds=time.perf_counter() - started,
        largest=[(size / GIB, c, what) for size, c, what in tracker.largest_at_peak.get("device", [])],
        total_peak=tracker.peak["all"] / GIB,
        largest_numel=tracker.largest_numel,
        kernel=kernel,
        kernel_calls=getattr(backend, "calls", Counter()),
    )
