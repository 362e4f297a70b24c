"""Starting and leaving the process group, the same way for every command.

A launcher (torchrun, the deepspeed launcher, accelerate launch, SLURM through torchrun) sets
RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; a command started without one runs
as a one-rank group on a free local port. On CUDA each process takes GPU LOCAL_RANK and
nccl; on CPU, gloo.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from ringpatch.errors import BadValue


def single_process_env() -> None:
    """Started without a launcher: the environment of a one-rank group on a free local port."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")


def launch_int(name: str, default: int, minimum: int = 0) -> int:
    """An integer the launcher sets in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
    LOCAL_WORLD_SIZE); a value that is not an integer >= minimum is a ValueError naming it."""
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise BadValue(
            f"{name}={raw!r} is not an integer >= {minimum}; the launcher (torchrun, deepspeed, accelerate launch) "
            f"sets it: unset {name}, or start the run under a launcher"
        ) from None
    return value


def local_device() -> tuple[torch.device, str]:
    """(this process' device, the backend for it), with the CUDA device made current."""
    if torch.cuda.is_available():
        index = launch_int("LOCAL_RANK", 0)
        torch.cuda.set_device(index)
        return torch.device("cuda", index), "nccl"
    return torch.device("cpu"), "gloo"


def start() -> torch.device:
    """Join the launcher's process group (or a one-rank one); returns this process' device."""
    single_process_env()
    device, backend = local_device()
    dist.init_process_group(backend)
    return device


def set_timeouts(timeout: timedelta) -> int:
    """Give every process group created so far (the world, the mesh's, DeepSpeed's) `timeout`
    for its collectives; subgroups otherwise keep torch's default (30 minutes for gloo).
    Returns how many groups were set."""
    from torch.distributed import distributed_c10d as c10d

    groups = [g for g in list(c10d._world.pg_map) if not c10d._rank_not_in_group(g)]
    for group in groups:
        c10d._set_pg_timeout(timeout, group)
    return len(groups)


def launch_store():
    """The launcher's key-value store behind the default process group (torch has no public
    getter: docs/private-apis.md): heartbeats and waits outside collectives use it."""
    from torch.distributed import distributed_c10d as c10d

    return c10d._get_default_store()


def is_timeout(error: BaseException) -> bool:
    """A collective that waited past its process group's timeout (gloo and nccl word it differently)."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("timed out" in text or "timeout" in text)


def stop() -> None:
    """Leave together: a rank that tears down gloo while a peer still runs can hang. Drop DDP or
    DeepSpeed engines before calling this (pytorch/pytorch#56297)."""
    dist.barrier()
    dist.destroy_process_group()


def leave(code: int):
    """End a command's process with `code` once its work is done and its groups are gone,
    without the interpreter's finalization. Gloo's worker threads free a finished collective's
    work on their own thread, and with it tensors whose Python objects need the GIL; when that
    happens after the main thread has entered finalization, taking the GIL ends the thread
    through a noexcept destructor and the process aborts with "terminate called without an
    active exception" (a core of an aborting rank: ProcessGroupGloo::runLoop ->
    ~AsyncBarrierWork -> ~AsyncAllgatherWork -> TensorImpl::decref_pyobject -> take_gil ->
    pthread_exit, while the main thread runs Py_FinalizeEx; pytorch/pytorch#190489). Seen about
    once in 190 complete 2-rank ZeRO-3 runs on 2 loaded cores, when they ended through
    finalization. Everything the run writes is closed before this (checkpoints, metrics,
    wandb.finish); the standard streams and logging are flushed here. For process entry points
    only (`__main__`)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def allocator_settings() -> None:
    """On CUDA, PyTorch's caching allocator with expandable segments: long-context steps allocate
    and free tensors of many sizes, and fixed segments leave the freed space fragmented (memory
    reserved but unusable, then an out-of-memory error well below the card's size). Must run
    before the first CUDA allocation; a value the user set (PYTORCH_CUDA_ALLOC_CONF or
    PYTORCH_ALLOC_CONF) is kept. Without a GPU, the C library's allocator returns freed tensors
    to the system (release_freed_host_memory)."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if not torch.cuda.is_available():
        release_freed_host_memory()


NCCL_DEFAULTS = {"NCCL_NVLS_ENABLE": "0"}
"""The NCCL environment the plan's reserve assumes unless the user sets it (plan/reserve.py reads
the same variables): NVLink SHARP off, so no communicator takes its ~288 MiB of NVLS buffers per
rank (long-context steps are bound by memory; the ring's exchanges are point to point).
NCCL_BUFFSIZE is left at NCCL's 4 MiB, at which the reserve's published figures were measured."""


def nccl_settings() -> None:
    """NCCL_DEFAULTS for the variables the user did not set; before the first process group."""
    for key, value in NCCL_DEFAULTS.items():
        os.environ.setdefault(key, value)


def unlink_deepspeed_shm() -> bool:
    """DeepSpeed's CPU all-reduce gives each rank a 66 MiB shared-memory workspace,
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, which every
    rank maps at deepspeed.init_distributed, and never unlinks it: each CPU run left 66 MiB of RAM
    per rank in /dev/shm after it ended (126 such files, 8.2 GiB, had piled up on this project's
    test machine). Collective: after a barrier (every rank has mapped every workspace by then),
    each rank unlinks its own name; the memory stays mapped until the processes end, then is
    freed. True when this rank's workspace was unlinked (False: none, e.g. ranks on several hosts)."""
    if not dist.is_initialized():
        return False
    dist.barrier()
    env = os.environ
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR')}_{env.get('MASTER_PORT')}_{dist.get_rank()}"
    )
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        return False
    return True


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def release_freed_host_memory(threshold: int = 1 << 20) -> bool:
    """Have glibc serve every block of `threshold` bytes or more with its own mapping, so that
    freeing a tensor gives its memory back. By default glibc raises that threshold (up to 32 MiB)
    whenever a mapped block is freed, and serves later blocks below it from its heap, which keeps
    freed blocks resident: on the bench model (bench/memory.py, checkpointing, S = 16K, 2 ranks)
    a step's resident peak was 0.92 GiB above idle for 0.46 GiB of live tensors; with this, 0.46.
    1 MiB, not lower: at 64 KiB every small tensor is a system call and page faults, and the
    demo's 300 training steps took 75 s against 52 s (53 s at 1 MiB). A value set in
    MALLOC_MMAP_THRESHOLD_ is kept. True when applied (False: not glibc, or set by the user)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
