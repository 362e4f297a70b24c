"""Real multi-process groups for tests: gloo over a file store, in worker processes kept for the test run.

Starting a process costs seconds here (torch and transformers import), more than most of the
checks run in it, so `spawn` keeps one group of workers per world size and sends each call's
function to it, as DeepSpeed's tests do with `reuse_dist_env`. Before each call a worker restores
what it had after joining: its torch RNG state, the environment, default dtype, grad mode and
thread count (imported modules and their caches stay); all ranks leave through a barrier. A failure in any
rank, a worker that dies, or a call that outlives HANG_S ends that group (a rank may be stuck in a
collective) and fails the caller with the rank's traceback; the next call starts a new group.

RINGPATCH_TEST_FRESH_PROCS=1 starts new processes for every call instead (torch.multiprocessing
spawn), to rule the reuse out when a multi-process test fails.
"""

from __future__ import annotations

import atexit
import os
import tempfile
import time
import traceback
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import HANG_S

FRESH = os.environ.get("RINGPATCH_TEST_FRESH_PROCS") == "1"
"""New processes for every call (torch.multiprocessing.spawn) instead of kept workers."""

KEEP = 2
"""Groups kept at once (the most recently used); an older one is closed to bound memory."""


def _join(rank: int, world_size: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)


def _entry(rank: int, world_size: int, store: str, fn, args) -> None:
    _join(rank, world_size, store)
    fn(rank, world_size, *args)
    dist.barrier()  # leave together: a rank tearing down gloo while its peer still runs can hang
    dist.destroy_process_group()


def _serve(rank: int, world_size: int, store: str, conn) -> None:
    """A worker: join the group once, then run each (fn, args) received, answering
    ("ok", None) or ("error", traceback). After an error it exits: its peers may be waiting in
    a collective it will never enter."""
    _join(rank, world_size, store)
    seed, environ, dtype = torch.initial_seed(), dict(os.environ), torch.get_default_dtype()
    while True:
        job = conn.recv()
        if job is None:
            break
        fn, args = job
        torch.manual_seed(seed)  # each call draws what this worker's first call drew
        try:
            fn(rank, world_size, *args)
            dist.barrier()
        except BaseException:
            conn.send(("error", f"rank {rank}:\n{traceback.format_exc()}"))
            os._exit(1)
        finally:
            os.environ.clear()
            os.environ.update(environ)
            torch.set_default_dtype(dtype)
            torch.set_grad_enabled(True)
            torch.set_num_threads(1)
        conn.send(("ok", None))
    dist.destroy_process_group()


class _Group:
    def __init__(self, world_size: int):
        context = mp.get_context("spawn")
        self.tmp = tempfile.TemporaryDirectory()
        store = os.path.join(self.tmp.name, "store")
        self.conns, self.procs = [], []
        for rank in range(world_size):
            ours, theirs = context.Pipe()
            proc = context.Process(target=_serve, args=(rank, world_size, store, theirs), daemon=False)
            proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)

    def run(self, fn, args) -> None:
        for conn in self.conns:
            conn.send((fn, args))
        pending = {conn: rank for rank, conn in enumerate(self.conns)}
        deadline = time.monotonic() + HANG_S
        while pending:
            ready = wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RuntimeError(f"ranks {sorted(pending.values())} did not finish {fn.__name__} in {HANG_S} s")
            for conn in ready:
                rank = pending.pop(conn)
                try:
                    status, detail = conn.recv()
                except EOFError:
                    self.procs[rank].join(5)
                    code = self.procs[rank].exitcode
                    raise RuntimeError(f"rank {rank} died running {fn.__name__} (exit code {code})") from None
                if status != "ok":
                    raise RuntimeError(f"{fn.__name__} failed in {detail}")

    def close(self, graceful: bool) -> None:
        if graceful:
            for conn in self.conns:
                try:
                    conn.send(None)
                except OSError:
                    pass
            for proc in self.procs:
                proc.join(10)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.tmp.cleanup()


_groups: dict[int, _Group] = {}


@atexit.register
def _close_all() -> None:
    while _groups:
        _groups.popitem()[1].close(graceful=True)


def spawn(fn, world_size: int, *args) -> None:
    """Run fn(rank, world_size, *args) in `world_size` processes joined in a gloo group.

    `fn` must be importable (module level). A failure in any rank fails the caller with
    that rank's traceback."""
    if FRESH:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_entry, args=(world_size, os.path.join(tmp, "store"), fn, args), nprocs=world_size, join=True)
        return
    group = _groups.pop(world_size, None) or _Group(world_size)
    while len(_groups) >= KEEP:
        _groups.pop(next(iter(_groups))).close(graceful=True)
    try:
        group.run(fn, args)
    except BaseException:
        group.close(graceful=False)
        raise
    _groups[world_size] = group  # most recently used last
