"""Stopping a run on request, with its progress kept: preemption and time limits.

A scheduler warns a job before it ends it: SLURM sends the signal asked for with `--signal`
(launch/slurm/finetune.sbatch asks for SIGUSR1 a grace period before the time limit), torchrun
passes SIGTERM on to its workers when it is itself terminated, and Kubernetes sends SIGTERM. On
SIGTERM or SIGUSR1, or when the file given as `--stop-file` appears, every rank finishes its
current optimizer step; the ranks agree at the end of the step (the request travels in the
all-reduce that averages the step's loss, so it costs no extra collective), write the usual
verified checkpoint at that step and exit with RESUME_EXIT. Running the same command again
resumes there.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

RESUME_EXIT = 75  # sysexits' EX_TEMPFAIL: stopped on request with a checkpoint; run the same command to go on
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Stopped(Exception):
    """The ranks stopped on request after checkpointing `step`."""

    def __init__(self, step: int, reason: str):
        super().__init__(
            f"stopped on request ({reason}) after step {step}, which is checkpointed; run the same command to resume"
        )
        self.step, self.reason = step, reason


class StopRequest:
    """Notes SIGTERM / SIGUSR1 (the previous handlers are restored by close) and watches an
    optional stop file. `pending` is this rank's view; the ranks agree through Trainer._step."""

    def __init__(self, stop_file: str | None = None):
        self.stop_file = Path(stop_file) if stop_file else None
        self.signal: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)

    def _note(self, signum, frame) -> None:
        self.signal = signum

    @property
    def pending(self) -> bool:
        return self.signal is not None or (self.stop_file is not None and self.stop_file.exists())

    def reason(self) -> str:
        if self.signal is not None:
            return f"{signal.Signals(self.signal).name} on at least one rank"
        if self.stop_file is not None and self.stop_file.exists():
            return f"{self.stop_file} exists"
        return "another rank was asked"

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
