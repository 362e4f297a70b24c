"""Restarts without a person: what a worker group started again by torchrun needs to know.

torchrun `--max-restarts N` starts a new worker group after any worker fails (an exception, a
SIGKILL, a lost node), up to N times; the workers see TORCHELASTIC_RESTART_COUNT and
TORCHELASTIC_MAX_RESTARTS. A new group resumes from the newest intact checkpoint as a re-run of
the same command would. This module keeps what the groups of one launch tell each other in
run_dir/attempts/:
- a failure record per failing rank (`attempt{A}-rank{R}.json`: the step it was taking and the
  error), so a restarted group says what it restarts from, and a failure on the last attempt
  names the step and rank of every attempt's failure instead of leaving a loop of tracebacks;
- `stopped.json` when a group stopped on request (stop.py): torchrun counts its exit 75 as a
  failure and would start a group that trains on past the stop, so a restarted group that finds
  it exits 75 at once.
The folder is cleared when a launch starts (attempt 0).

RINGPATCH_FAULT injects a failure, to test this machinery: `ACTION@STEP[:rank=R][:attempt=A]`,
ACTION `raise` (a RuntimeError) or `kill` (SIGKILL of the rank itself) before global step STEP,
on rank R (default 0), in attempt A only (default every attempt).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from ringpatch.errors import BadValue
from ringpatch.parallel import launch_int
from ringpatch.train.checkpoint import atomic_write

FOLDER = "attempts"
STOPPED = "stopped.json"
FAULT_ENV = "RINGPATCH_FAULT"


def attempt() -> tuple[int, int]:
    """(this worker group's restart count, the launch's --max-restarts); (0, 0) outside torchrun."""
    return launch_int("TORCHELASTIC_RESTART_COUNT", 0), launch_int("TORCHELASTIC_MAX_RESTARTS", 0)


SHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def check_restarts(recipe, max_restarts: int) -> None:
    """Restarts resume from checkpoints: refuse them where only stage ends are checkpointed, and
    where torchrun would hand a restarted group the failed group's store."""
    if max_restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise BadValue(
            f"torchrun --max-restarts {max_restarts} shares its rendezvous store with the workers (torch's default), "
            "so a restarted group finds the failed group's addresses there and fails or hangs connecting to them "
            f"(pytorch/pytorch#135712): set {SHARED_STORE}=1 in torchrun's environment (make finetune-1m and "
            "launch/slurm/finetune.sbatch do)"
        )
    if max_restarts > 0 and recipe.save_every == 0:
        raise BadValue(
            f"torchrun --max-restarts {max_restarts} restarts a failed run from its latest checkpoint, but the recipe "
            "has save_every: 0 (checkpoints only at stage ends), so a restart would redo the whole stage: set "
            "save_every (e.g. 25), or launch without --max-restarts"
        )


_PEER_LOST = ("connection closed by peer", "connection reset", "broken pipe", "socket", "nccl", "timed out")


def _lost_peer(text: str) -> bool:
    return any(s in text.lower() for s in _PEER_LOST)


def primary(error: BaseException) -> bool:
    """An error of this rank's own, not the loss of a peer that failed first."""
    return not _lost_peer(str(error))


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(record))


def start_launch(run_dir: str | Path) -> None:
    """Rank 0 at attempt 0: forget the previous launch's attempts."""
    shutil.rmtree(Path(run_dir) / FOLDER, ignore_errors=True)


def first_line(error: BaseException) -> str:
    """The error's type and first sentence, without a library's source path."""
    text = " ".join(str(error).split())
    text = re.sub(r"^\[[^\]]*\] ", "", text)  # gloo's "[/path/pair.cc:537] "
    text = re.split(r"(?<=\.) ", text, maxsplit=1)[0]
    return f"{type(error).__name__}: {text[:300]}"


def record_failure(run_dir: str | Path, rank: int, step: int | None, error: BaseException) -> None:
    """This rank failed while taking global step `step` (None: while the run was being built)."""
    text = first_line(error)
    try:
        _write(Path(run_dir) / FOLDER / f"attempt{attempt()[0]}-rank{rank}.json", {"step": step, "error": text})
    except OSError:
        pass  # a full or read-only disk must not hide the error itself


def failures(run_dir: str | Path) -> dict[int, dict[int, dict]]:
    """{attempt: {rank: record}} of this launch."""
    found: dict[int, dict[int, dict]] = {}
    for path in sorted((Path(run_dir) / FOLDER).glob("attempt*-rank*.json")):
        match = re.fullmatch(r"attempt(\d+)-rank(\d+)\.json", path.name)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if match:
            found.setdefault(int(match[1]), {})[int(match[2])] = record
    return found


def describe(records: dict[int, dict]) -> tuple[int | None, str]:
    """(the step, who failed) for one attempt's records. A rank whose error is about losing a peer
    failed because another did; the others are named first."""
    if not records:
        return None, "no rank recorded an error (killed: SIGKILL, out of memory, a lost node)"
    steps = [r["step"] for r in records.values() if r.get("step") is not None]
    first = {k: r for k, r in records.items() if not _lost_peer(r["error"])}
    if first:
        who = "; ".join(f"rank {rank}: {r['error']}" for rank, r in sorted(first.items()))
    else:
        lost = sorted(records)
        who = (
            f"rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} lost a peer, and no rank recorded an "
            "error of its own: one was killed (SIGKILL, out of memory, a lost node)"
        )
    return (max(steps) if steps else None), who


def restart_notice(run_dir: str | Path, resumed_step: int) -> str | None:
    """What rank 0 of a restarted group prints: which restart, what failed, where it resumes."""
    count, most = attempt()
    if count == 0:
        return None
    records = failures(run_dir).get(count - 1, {})
    step, who = describe(records)
    at = f"at step {step}" if step is not None else ("before its first step" if records else "at an unknown step")
    return (
        f"restart {count} of {most} (torchrun --max-restarts): the previous worker group failed {at} ({who}); "
        f"resuming from step {resumed_step}"
    )


def last_attempt_summary(run_dir: str | Path) -> str | None:
    """On the last attempt, the failure of every attempt of this launch, for the final message;
    None while torchrun has restarts left."""
    count, most = attempt()
    if most == 0 or count < most:
        return None
    history = failures(run_dir)
    steps = []
    lines = []
    for a in range(count + 1):
        step, who = describe(history.get(a, {}))
        steps.append(step)
        lines.append(f"attempt {a + 1}: step {step if step is not None else '?'} ({who})")
    same = len(set(steps)) == 1 and steps[0] is not None
    head = (
        f"the run failed at step {steps[0]} on every one of its {count + 1} attempts"
        if same
        else f"the run failed on every one of its {count + 1} attempts"
    )
    return (
        f"{head} (torchrun --max-restarts {most}), so it is not restarted again: "
        + "; ".join(lines)
        + ". Fix the cause, then run the same command to resume from the last checkpoint"
    )


def note_stop(run_dir: str | Path, step: int) -> None:
    """Rank 0, after every rank checkpointed `step` on request."""
    _write(Path(run_dir) / FOLDER / STOPPED, {"step": step})


def stopped_before(run_dir: str | Path) -> int | None:
    """In a restarted group: the step at which an earlier group of this launch stopped on request."""
    if attempt()[0] == 0:
        return None
    try:
        return json.loads((Path(run_dir) / FOLDER / STOPPED).read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


@dataclass(frozen=True)
class Fault:
    action: str
    step: int
    rank: int = 0
    attempt: int | None = None

    @classmethod
    def from_env(cls) -> Fault | None:
        text = os.environ.get(FAULT_ENV, "").strip()
        if not text:
            return None
        match = re.fullmatch(r"(raise|kill)@(\d+)((?::(?:rank|attempt)=\d+)*)", text)
        if not match:
            raise BadValue(
                f"{FAULT_ENV}={text!r} is not ACTION@STEP[:rank=R][:attempt=A] with ACTION raise or kill, e.g. "
                "kill@7:rank=1:attempt=0; unset it to train without an injected failure"
            )
        options = dict(part.split("=") for part in match[3].split(":") if part)
        return cls(match[1], int(match[2]), int(options.get("rank", 0)),
                   int(options["attempt"]) if "attempt" in options else None)  # fmt: skip

    def before_step(self, step: int, rank: int) -> None:
        """Called before global step `step` (1-based) on every rank."""
        if step != self.step or rank != self.rank or self.attempt not in (None, attempt()[0]):
            return
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure ({FAULT_ENV}) before step {step} on rank {rank}")
