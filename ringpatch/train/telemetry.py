"""What each logged step reports about itself: time per phase, MFU, memory against the plan,
and the slowest rank.

- Phases: data, forward, backward, optimizer (DeepSpeed's step), checkpoint. On CUDA each
  boundary synchronizes the device, so a phase's time is its own (a few syncs per step, nothing
  beside a step of seconds).
- MFU: the step's model FLOPs per GPU (plan.step_flops, the number `ringpatch plan` prints:
  forward and backward of every matmul and of causal attention, no recompute) over the step's
  time and the device's peak. The peak is the recipe's `peak_tflops`, else the dense bf16/fp16
  (float32: tf32) figure of a known GPU, else, on CPU, a float32 matmul measured at start; the run
  states which in its start record.
- Memory: on CUDA torch's peak allocated and reserved bytes since the previous step; on CPU the
  process's peak resident size (VmHWM, reset each step through /proc/self/clear_refs). Beside it
  the plan's figure for the stage: the tensors on CUDA (what the allocator counts), tensors and
  reserve on CPU (a process's whole resident size). A step over the plan by more than 10% is
  warned about once per stage.
- The slowest rank: every log step the ranks gather their busy time (the step less the time
  spent waiting in its closing all-reduce, where a fast rank waits for a slow one); the slowest
  and its lag over the median are logged. A rank slowed inside the ring's own collectives slows
  its peers there too; this names the rank that is late at the step's end.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

PHASES = ("data", "forward", "backward", "optimizer", "checkpoint")
OVER_PLAN = 1.10

# dense bf16 TFLOP/s per GPU, float32 runs at tf32's (half); the first name found in the device's name
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
                    "A800": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0, "V100": 125.0}  # fmt: skip


def peak_tflops(device: torch.device, dtype: torch.dtype, override: float | None) -> tuple[float | None, str]:
    """(peak TFLOP/s per device, where the figure comes from); None for a GPU not in the table."""
    if override:
        return override, "the recipe's peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, bf16 in PEAK_BF16_TFLOPS.items():
            if key in name:
                value = bf16 if dtype in (torch.bfloat16, torch.float16) else bf16 / 2
                return value, f"{name}, dense {'bf16' if value == bf16 else 'tf32'} from its data sheet"
        return None, f"no peak is known for {name!r}: MFU is not logged; set peak_tflops in the recipe"
    return _measured_cpu_tflops(dtype), f"a {dtype} matmul measured on this CPU at start"


def _measured_cpu_tflops(dtype: torch.dtype) -> float:
    n = 512
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + 0.3
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - started))
    return best / 1e12


class StepClock:
    """Seconds per phase of the current step: `with clock("forward"): ...`; `last`, the latest
    phase's own."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.last = 0.0

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def __call__(self, phase: str):
        if self.cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.last = time.perf_counter() - started
            self.seconds[phase] += self.last


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_gib(field: str) -> float | None:
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(found[1]) / 2**20 if found else None


class MemoryPeak:
    """This step's peak memory, with the plan's figure for the stage beside it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.warned: set[int] = set()
        self.reset()

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident size
        except OSError:
            pass

    def read(self) -> dict[str, float]:
        if self.cuda:
            return {
                "mem_peak_gib": torch.cuda.max_memory_allocated(self.device) / 2**30,
                "mem_reserved_gib": torch.cuda.max_memory_reserved(self.device) / 2**30,
            }
        peak = _status_gib("VmHWM")
        return {} if peak is None else {"mem_peak_gib": peak, "mem_rss_gib": _status_gib("VmRSS") or 0.0}

    def planned(self, budget) -> float:
        """The plan's figure comparable to mem_peak_gib."""
        return budget.tensors if self.cuda else budget.total

    def over_plan(self, stage: int, measured: float, planned: float, parts: str = "") -> str | None:
        """A warning, once per stage, when measured exceeds planned by more than 10% (`parts`: what
        the plan's figure is made of, for the message)."""
        if measured <= OVER_PLAN * planned or stage in self.warned:
            return None
        self.warned.add(stage)
        what = "allocated" if self.cuda else "resident (VmHWM)"
        return (
            f"stage {stage}: peak {what} memory {measured:.2f} GiB is {measured / planned:.2f}x the plan's "
            f"{planned:.2f} GiB{f' ({parts})' if parts else ''}, over by more than {OVER_PLAN - 1:.0%}; the plan may "
            "miss something at this shape: compare `ringpatch plan --recipe ... --simulate`, and keep headroom"
        )

    def parts(self, budget) -> str:
        """What planned() adds up, in words."""
        if self.cuda:
            return f"the step's tensors; reserve {sum(budget.reserve.values()):.2f} GiB besides"
        reserve = ", ".join(f"{k} {v:.2f}" for k, v in budget.reserve.items())
        return f"tensors {budget.tensors:.3f} + {reserve}"


def slowest_rank(busy_s: float, device: torch.device) -> dict[str, float]:
    """Every rank's busy time this step, gathered: {slowest_rank, slowest_lag_s} (a collective)."""
    world = dist.get_world_size()
    mine = torch.tensor([busy_s], dtype=torch.float64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    times = torch.cat(everyone).cpu()
    slowest = int(times.argmax())
    return {"slowest_rank": slowest, "slowest_lag_s": float(times[slowest] - times.median())}
