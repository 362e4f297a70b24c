"""One run per run_dir: a lock file that names its owner.

Two launches on one run_dir would share checkpoints, interleave metrics.jsonl and resume from
each other mid-run, all silently. Rank 0 of a run takes run_dir/ringpatch.lock, created
exclusively (O_EXCL), before any process group, and holds it until the run ends. The file
names the owner's host, pid and start time. A lock whose owner is gone (same host, no such
process: a killed run) is taken over with a message; a lock held by a live process, or by
another host (whose processes cannot be seen from here), is refused with the owner and the way
out.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ringpatch.errors import BadValue

LOCK_FILE = "ringpatch.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """run_dir/ringpatch.lock, held by this process from acquire() to release()."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            return
        raise BadValue(f"could not take {self.path}: another launch took it at the same time")

    def _take_over_or_refuse(self) -> None:
        try:
            held = json.loads(self.path.read_text())
        except (OSError, ValueError):
            held = {}
        host, pid = held.get("host"), held.get("pid")
        if host == self.owner["host"] and isinstance(pid, int) and not _alive(pid):
            print(
                f"ringpatch: {self.path} was left by pid {pid} (started {held.get('started')}), which has ended; taking it over"
            )
            self.path.unlink(missing_ok=True)
            return
        raise BadValue(
            f"{self.path.parent} is in use by another run (pid {pid} on {host}, started {held.get('started')}): "
            "two runs on one run_dir would overwrite each other's checkpoints and metrics; wait for it to end or "
            f"choose another run_dir (if that run is gone, e.g. on another host, delete {self.path})"
        )

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == self.owner["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass
