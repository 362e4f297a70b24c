"""The recipe trainer: ring attention over sp, DeepSpeed ZeRO and AutoTP, stages that extend the context.

    torchrun --nproc_per_node 2 -m ringpatch.train --recipe recipes/tiny-cpu.yaml
    deepspeed --num_gpus 8 -m ringpatch.train --recipe recipes/llama3-8b-256k-1node.yaml
    accelerate launch --config_file launch/accelerate/1node-8gpu.yaml -m ringpatch.train --recipe ...

Every check that needs no process group runs first (preflight.py). Then: the dp x sp x tp
grid, the model (patched for the ring, wrapped so its loss is the chunked cross-entropy), the
DeepSpeed engine (build.py), and for each stage its RoPE, its prepared data and its steps (loop.py). A checkpoint
every save_every steps and at each stage end; re-running the same command resumes from the
latest complete one. The end is a Hugging Face folder, run_dir/final, that needs no ringpatch.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from ringpatch.errors import USER_ERRORS, BadValue
from ringpatch.flags import Parser
from ringpatch.parallel import allocator_settings, launch_int, nccl_settings
from ringpatch.plan.check import check_index_edge, check_memory, device_memory_gib
from ringpatch.plan.preflight import preflight
from ringpatch.train import restart
from ringpatch.train.extras import check_engine
from ringpatch.train.lock import RunLock
from ringpatch.train.stop import RESUME_EXIT


def main(argv: list[str] | None = None) -> int:
    allocator_settings()  # before anything touches CUDA
    nccl_settings()  # what the plan's reserve assumes, unless set
    parser = Parser(prog="ringpatch train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="a recipe YAML (recipes/)")
    parser.add_argument("--run-dir", help="override the recipe's run_dir")
    parser.add_argument(
        "--deepspeed", help="a DeepSpeed JSON of tuning knobs (launch/deepspeed/); overrides the recipe's"
    )
    parser.add_argument("--no-resume", action="store_true", help="refuse to start when run_dir holds a checkpoint")
    parser.add_argument("--max-steps", type=int, help="stop after this global step (a partial run that resumes later)")
    parser.add_argument(
        "--force", action="store_true", help="start even when the plan's memory estimate exceeds the device's memory"
    )
    parser.add_argument(
        "--stop-file",
        help="stop (checkpointed, exit 75) at the end of the step during which this file appears, as on SIGTERM or "
        "SIGUSR1; it is removed once honoured",
    )
    parser.add_argument(
        "--grace",
        type=float,
        help="seconds a scheduler gives between its stop signal and the kill (SLURM's --signal=B:USR1@GRACE); the "
        "run warns at start when the last checkpoint took longer",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = parser.parse_args(argv)

    lock = None
    try:
        rank = launch_int("RANK", 0)
        restarted, max_restarts = restart.attempt()
        if args.max_steps is not None and args.max_steps < 1:
            raise BadValue(f"--max-steps must be >= 1, got {args.max_steps}")
        if args.grace is not None and not args.grace > 0:
            raise BadValue(f"--grace must be a positive number of seconds, got {args.grace}")
        restart.Fault.from_env()
        if args.stop_file is not None and (not args.stop_file.strip() or Path(args.stop_file).exists()):
            raise BadValue(
                f"--stop-file {args.stop_file!r} "
                + ("is empty" if not args.stop_file.strip() else "exists already, so the run would stop after one step")
                + ": give a path that does not exist yet (the run stops when it appears)"
            )
        plan = preflight(args.recipe, run_dir=args.run_dir, deepspeed_file=args.deepspeed, deep=True)
        check_engine(plan.recipe)
        restart.check_restarts(plan.recipe, max_restarts)
        stopped_at = restart.stopped_before(plan.recipe.run_dir)
        if stopped_at is not None:  # torchrun restarted a group that had stopped on request: stay stopped
            # every rank says so: the first to exit has torchrun terminate the others
            print(
                f"ringpatch train (rank {rank}): the run stopped on request at step {stopped_at} "
                "(checkpointed); torchrun restarted it, but it stays stopped: run the same command to resume",
                file=sys.stderr,
                flush=True,
            )
            return RESUME_EXIT
        check_index_edge(plan)
        if not args.force:
            check_memory(plan, *device_memory_gib())
        if rank == 0:  # one owner per run; the other ranks follow rank 0
            lock = RunLock(plan.recipe.run_dir)
            lock.acquire()
            if restarted == 0:
                restart.start_launch(plan.recipe.run_dir)
    except USER_ERRORS as e:  # before any process group: a plain message, on one line, and exit 2
        print(f"ringpatch train: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    from ringpatch.parallel import is_timeout
    from ringpatch.train.build import timeout
    from ringpatch.train.loop import RunFolderGone, Trainer  # the heavy imports come after the checks
    from ringpatch.train.stop import Stopped
    from ringpatch.train.watchdog import SilentRank

    trainer = stopped = None
    try:
        # a restarted group resumes what this launch checkpointed, --no-resume or not
        trainer = Trainer(
            plan, resume=not args.no_resume or restarted > 0, stop_file=args.stop_file, grace_s=args.grace
        )
        try:
            trainer.run(max_steps=args.max_steps)
        except Stopped as e:  # every rank checkpointed the same step: a clean exit that asks to be resumed
            stopped = e
        trainer.close()
        if lock is not None:
            lock.release()
    except RunFolderGone as e:  # nothing to record into: one line from rank 0, exit 2 on every rank
        if rank == 0:
            print(f"\nringpatch train: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    except Exception as e:
        gone = trainer.folder.problem() if trainer is not None else None
        if gone is not None:  # the folder went between the step's check and a write (or a peer's loss)
            if rank == 0:  # the same line and exit as at the check; nothing is written (no failure record)
                print(f"\nringpatch train: {gone}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(2)
        restart.record_failure(plan.recipe.run_dir, rank, trainer.step_in_progress if trainer else None, e)
        summary = restart.last_attempt_summary(plan.recipe.run_dir) if rank == 0 or restart.primary(e) else None
        if summary:
            print(f"\nringpatch train (rank {rank}): {summary}", file=sys.stderr, flush=True)
        if is_timeout(e):
            minutes = timeout(plan).total_seconds() / 60
            e = (
                trainer.heartbeat.diagnose(minutes)
                if trainer is not None
                else f"a collective waited past timeout_minutes ({minutes:g}) while the run was being built: "
                f"{str(e).splitlines()[0]}"
            )
        elif not restart.primary(e):
            e = f"another rank failed, and this one lost its connection to it ({restart.first_line(e)})"
        elif not isinstance(e, (*USER_ERRORS, SilentRank)):
            traceback.print_exc()  # a bug: its traceback is the report
        # inside the process groups: leave at once, since a rank that waits for its peers to
        # tear down could hang; the launcher stops the other ranks
        # on a line of its own (a progress bar may be mid-line)
        print(f"\nringpatch train (rank {rank}): {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        if lock is not None:
            lock.release()
        os._exit(1)
    if stopped is not None:
        if rank == 0:
            print(f"\nringpatch train: {stopped}", file=sys.stderr, flush=True)
        return RESUME_EXIT
    return 0
