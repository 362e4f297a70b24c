"""One run per run_dir: the lock is exclusive, names its owner, and a dead owner's lock is taken over."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ringpatch.train.lock import LOCK_FILE, RunLock

pytestmark = pytest.mark.unit


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_lock_is_refused_naming_its_owner(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(ValueError, match=rf"{tmp_path} is in use by another run \(pid {first.owner['pid']} on "):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    second = RunLock(tmp_path)
    second.acquire()  # free again
    second.release()


def test_a_dead_owners_lock_is_taken_over_and_another_hosts_refused(tmp_path, capsys):
    lock = RunLock(tmp_path)
    pid = _dead_pid()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": lock.owner["host"], "pid": pid, "started": "earlier"}))
    lock.acquire()
    assert f"was left by pid {pid} (started earlier), which has ended; taking it over" in capsys.readouterr().out
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == lock.owner["pid"]
    lock.release()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node-7", "pid": pid, "started": "earlier"}))
    with pytest.raises(ValueError, match=r"pid \d+ on node-7.* delete .*ringpatch.lock"):
        RunLock(tmp_path).acquire()
