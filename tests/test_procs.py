"""tests.helpers.procs.spawn keeps its workers between calls: a failure still fails the call that
made it, even while a peer waits in a collective, and no call sees what an earlier one changed."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests.helpers.procs import FRESH, spawn

pytestmark = pytest.mark.multiprocess
reused = pytest.mark.skipif(FRESH, reason="torch.multiprocessing.spawn's own errors then")


def _raise_while_the_peer_waits(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 refuses")
    dist.all_reduce(torch.ones(1))  # never matched


def _exit_while_the_peer_waits(rank: int, world: int) -> None:
    if rank == 0:
        os._exit(3)
    dist.barrier()


def _record_and_change_state(rank: int, world: int, out: str) -> None:
    seen = [os.environ.get("RINGPATCH_TEST_LEFT_BEHIND"), str(torch.get_default_dtype()), torch.rand(3).tolist()]
    with open(os.path.join(out, str(rank)), "a") as f:
        f.write(f"{seen}\n")
    os.environ["RINGPATCH_TEST_LEFT_BEHIND"] = "1"
    torch.set_default_dtype(torch.float64)
    dist.barrier()


@reused
def test_a_failing_rank_fails_the_call_while_its_peer_waits_in_a_collective():
    with pytest.raises(RuntimeError, match="rank 1 refuses"):
        spawn(_raise_while_the_peer_waits, 2)


@reused
def test_a_rank_that_dies_fails_the_call():
    with pytest.raises(RuntimeError, match=r"rank 0 died .*exit code 3"):
        spawn(_exit_while_the_peer_waits, 2)


def test_no_call_sees_the_environment_or_dtype_an_earlier_one_left(tmp_path):
    for _ in range(3):  # the first call may follow a failure above: a new group
        spawn(_record_and_change_state, 2, str(tmp_path))
    for rank in range(2):
        calls = (tmp_path / str(rank)).read_text().splitlines()
        assert all(c.startswith("[None, 'torch.float32', ") for c in calls), calls  # nothing left behind
        if not FRESH:  # a kept worker draws as it did at the start
            assert len(set(calls)) == 1, calls
