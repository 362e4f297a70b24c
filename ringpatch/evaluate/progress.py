"""What an evaluation will cost before it starts, and its progress while it runs.

Every prompt of every task is scored by ring prefills (prefill.py): one forward of the patched
model over the prompt, cut over the ranks. So the cost of a model's evaluation is its prefills,
each weighted by its forward FLOPs (hf/counts.py forward_flops: linear in the length, plus
attention's square), and the first prefill's time turns that into seconds. A forward hook on the
model counts the prefills as they happen, whichever task makes them, and moves one tqdm bar on
rank 0 by their FLOPs, so its rate and ETA stay right across lengths.
"""

from __future__ import annotations

import sys
import time

from ringpatch.hf.counts import forward_flops


def describe_prefills(prefills: dict[str, list[tuple[int, int]]]) -> str:
    """One line per task: its prefills by length, from {task: [(length, rows), ...]}."""
    lines = []
    for task, runs in prefills.items():
        by_length: dict[int, int] = {}
        for length, _ in runs:
            by_length[length] = by_length.get(length, 0) + 1
        cells = ", ".join(f"{count} x {length:,}" for length, count in sorted(by_length.items()))
        rows = max((r for _, r in runs), default=1)
        lines.append(f"  {task}: {len(runs)} prefills ({cells} tokens{f'; {rows} rows each' if rows > 1 else ''})")
    return "\n".join(lines)


class Progress:
    """The bar over one model's prefills, on rank 0 (enabled) only: `with Progress(model, ...) as p:`,
    setting `p.task` to the task that runs.

    planned: [(length, rows)] of the prefills the tasks expect (at least: RULER's teacher scorer
    prefills a prompt again when the model answers in another order, and generation once per
    written token); a prefill beyond them grows the total."""

    def __init__(self, model, planned: list[tuple[int, int]], sp_size: int, label: str, enabled: bool):
        self.model, self.cfg = model, model.config.to_dict()
        self.planned, self.sp_size, self.label, self.enabled = planned, sp_size, label, enabled
        flops = sum(rows * forward_flops(self.cfg, length, head_tokens=0) for length, rows in planned)
        self.unit, self.scale = ("TFLOP", 1e12) if flops >= 1e12 else ("GFLOP", 1e9)
        self.total = flops / self.scale
        self.task = ""
        self.count = 0
        self.started = 0.0
        self.bar = None
        self.handles = []

    def _work(self, length: int, rows: int) -> float:
        """A prefill's forward FLOPs in the bar's unit."""
        return rows * forward_flops(self.cfg, length, head_tokens=0) / self.scale

    def _before(self, module, args, kwargs) -> None:
        self.started = time.perf_counter()

    def _after(self, module, args, kwargs, output) -> None:
        ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
        rows, local = ids.shape  # (B, S_local): this rank's part of a prefill over sp_size ranks
        length = local * self.sp_size
        work = self._work(length, rows)
        self.count += 1
        if self.bar is None:
            seconds = time.perf_counter() - self.started
            print(
                f"ringpatch eval: {self.label}: the first prefill ({rows} x {length:,} tokens) took {seconds:.1f} s; "
                f"its {len(self.planned)} planned prefills will take about {_duration(seconds * self.total / work)}",
                file=sys.stderr,
                flush=True,
            )
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=f"eval {self.label}", file=sys.stderr,
                            bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} " + self.unit + " [{elapsed}<{remaining}{postfix}]")  # fmt: skip
        if self.count > len(self.planned):
            self.bar.total += work
        self.bar.set_postfix_str(f"{self.task}, prefill {self.count}, {length:,} tokens", refresh=False)
        self.bar.update(work)

    def __enter__(self):
        if self.enabled:
            self.handles = [
                self.model.register_forward_pre_hook(self._before, with_kwargs=True),
                self.model.register_forward_hook(self._after, with_kwargs=True),
            ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
