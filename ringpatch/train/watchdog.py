"""Which rank stopped making progress, when a collective times out.

Every rank's daemon thread writes the time into the launcher's key-value store every few
seconds. A rank that is stopped (SIGSTOP, a debugger, a node that froze) or stuck in code that
holds the GIL stops beating; when a collective on another rank times out (the process groups'
timeout is the recipe's timeout_minutes), that rank reads the beats and names the silent ranks.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import torch.distributed as dist

from ringpatch.parallel.process import launch_store

KEY = "ringpatch/heartbeat/{}"


class SilentRank(RuntimeError):
    """A rank stopped making progress while the others waited for it (a message for the user)."""


class Heartbeat:
    def __init__(self, interval_s: float = 2.0):
        self.interval = interval_s
        self.store = launch_store()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._stop = threading.Event()
        self._beat()  # the key exists before any rank can read it (the caller's next collective)
        self._thread = threading.Thread(target=self._run, name="ringpatch-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self.store.set(KEY.format(self.rank), repr(time.time()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception:  # the store went away: the job is ending
                return

    def close(self) -> None:
        """Stop beating and wait for the thread, before the process group (and its store) goes: a
        thread still inside a store call at interpreter exit can abort the process."""
        self._stop.set()
        self._thread.join(timeout=10)
        self.store = None

    def silent_ranks(self) -> dict[int, float]:
        """{rank: seconds since its last beat} for ranks silent for over 3 intervals."""
        try:
            self.store.set_timeout(timedelta(seconds=10))
        except Exception:
            pass
        now, silent = time.time(), {}
        for rank in range(self.world):
            try:
                age = now - float(self.store.get(KEY.format(rank)).decode())
            except Exception:  # the store itself is gone with its host rank
                age = float("inf")
            if age > 3 * self.interval:
                silent[rank] = age
        return silent

    def require(self, rank: int, doing: str):
        """A check for a wait outside the collectives (the store): it raises when `rank` has gone
        silent while `doing`, naming it."""

        def check() -> None:
            age = self.silent_ranks().get(rank)
            if age is not None:
                raise SilentRank(
                    f"rank {rank} stopped making progress while {doing} (silent for {age:.0f} s): check that rank's "
                    "host (a stopped process, a frozen node); run the same command to resume"
                )

        return check

    def diagnose(self, minutes: float) -> str:
        silent = self.silent_ranks()
        if not silent:
            return (
                f"no rank made progress for {minutes:g} minutes in a collective, yet every rank is alive: they wait "
                "in different collectives (please report this with the log), or a link between nodes is down"
            )
        names = ", ".join(
            f"rank {r} (silent for {age:.0f} s)" if age != float("inf") else f"rank {r} (unreachable)"
            for r, age in silent.items()
        )
        return (
            f"{names} stopped making progress; this rank waited {minutes:g} minutes (timeout_minutes) for it "
            "in a collective. Check that rank's host (stopped process, frozen node, a hung GPU); run the same "
            "command to resume from the last checkpoint"
        )
