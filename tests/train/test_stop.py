"""Days on a cluster. Stopping on request (ringpatch/train/stop.py): SIGTERM through the launcher
checkpoints the step every rank agrees on and exits 75; the same command resumes to an
uninterrupted run's losses; a stop file does the same; the SLURM script asks for its signal and
requeues. Restarts (restart.py): a killed rank under torchrun --max-restarts resumes by itself;
a failure that repeats stops after the restarts, naming its step. The metrics of every step and
the run's report (telemetry.py, report.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import HANG_S
from tests.helpers.trainrun import ENV, ROOT, command, hold, launch, metrics, ok, recipe, wait_for

LONG = {"parallel__sp": 2, "stages__0__steps": 30, "save_every": 3}
RESTARTS = dict(ENV, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # a store per worker group (restart.py)


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, data):
    """The uninterrupted run's folder."""
    folder = tmp_path_factory.mktemp("whole")
    ok(launch(recipe(folder, data, **LONG), 2))
    return folder / "run"


@pytest.fixture(scope="module")
def whole(whole_run):
    """The uninterrupted run's losses."""
    return metrics(whole_run)[0]


def _resumes_to_the_same_losses(path, run, step: int, whole) -> None:
    assert (run / "checkpoints" / "latest").read_text() == f"step{step:09d}"
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "stopped" and e["step"] == step for e in events), events
    assert not (run / "final").exists()
    resumed = launch(path, 2)
    ok(resumed)
    assert f"resuming {run / 'checkpoints'} at step {step}" in resumed.stdout + resumed.stderr
    torch.testing.assert_close(torch.tensor(metrics(run)[0]), torch.tensor(whole), rtol=1e-6, atol=0)


def _held_at_first_checkpoint(cmd, path, run, act, env=ENV, then=None) -> tuple[subprocess.Popen, str]:
    """Start `cmd`, hold every process of the launch (SIGSTOP) at its first checkpoint, call
    `act(proc)` there, let it go on, call `then(proc)` if given, and return the process and its
    stderr once it ends: the action lands mid-run however fast or slow the machine is."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    wait_for(lambda: (run / "checkpoints" / "latest").is_file(), "the first checkpoint")
    hold(path)
    act(proc)
    hold(path, signal.SIGCONT)
    if then is not None:
        then(proc)
    _, err = proc.communicate(timeout=HANG_S)
    return proc, err


@pytest.mark.e2e
def test_sigterm_to_the_launcher_checkpoints_the_step_and_the_same_command_resumes(tmp_path, data, whole):
    """torchrun passes a SIGTERM on to its workers; they agree, checkpoint the step they are at and
    exit 75. The run is held (SIGSTOP) at its first checkpoint while the signal is sent, so it
    is mid-run however fast or slow the machine is."""
    path = recipe(tmp_path, data, **LONG)
    run = tmp_path / "run"
    # the launcher is asked to end, as a scheduler or scancel would
    _, err = _held_at_first_checkpoint(command(path, 2), path, run, lambda proc: os.kill(proc.pid, signal.SIGTERM))
    found = re.search(
        r"stopped on request \(SIGTERM on at least one rank\) after step (\d+), which is checkpointed", err
    )
    assert found, err[-4000:]
    step = int(found[1])
    assert 3 <= step < 30
    _resumes_to_the_same_losses(path, run, step, whole)


@pytest.mark.e2e
def test_a_second_sigterm_during_the_stop_still_ends_75_with_the_step_checkpointed(tmp_path, data):
    """One process (`python -m ringpatch.train`), a checkpoint every step: a SIGTERM while it is
    held, then another just after it goes on, which lands in the step or its checkpoint write;
    the process still ends 75, with `latest` at the step it names."""
    import time

    path = recipe(tmp_path, data, stages__0__steps=200, save_every=1)
    run = tmp_path / "run"

    def again(proc):
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)

    proc, err = _held_at_first_checkpoint(command(path, 1, launcher="python"), path, run,
                                          lambda proc: os.kill(proc.pid, signal.SIGTERM), then=again)  # fmt: skip
    assert proc.returncode == 75, err[-4000:]
    found = re.search(r"stopped on request \(SIGTERM on at least one rank\) after step (\d+)", err)
    assert found, err[-4000:]
    assert (run / "checkpoints" / "latest").read_text() == f"step{int(found[1]):09d}"


@pytest.mark.e2e
def test_a_stop_file_stops_the_run_at_the_step_it_appears_in(tmp_path, data, whole):
    path = recipe(tmp_path, data, **LONG)
    run, stop = tmp_path / "run", tmp_path / "stop"
    # under --max-restarts: torchrun counts exit 75 as a failure and starts the group again, which stays stopped
    cmd = _with_restarts(command(path, 2, "--stop-file", str(stop)), 1)
    _, err = _held_at_first_checkpoint(cmd, path, run, lambda proc: stop.touch(), env=RESTARTS)
    assert "exitcode  : 75" in err, err[-4000:]  # torchrun reports the workers' "resume me"
    found = re.search(rf"stopped on request \({re.escape(str(stop))} exists\) after step (\d+)", err)
    assert found, err[-4000:]
    assert f"the run stopped on request at step {found[1]} (checkpointed); torchrun restarted it, but it stays" in err
    assert not stop.exists()  # honoured, then removed: the next run does not stop at once
    _resumes_to_the_same_losses(path, run, int(found[1]), whole)


def _with_restarts(cmd: list[str], n: int) -> list[str]:
    """A torchrun command line with --max-restarts n (before its -m)."""
    at = cmd.index("-m")
    return [*cmd[:at], f"--max-restarts={n}", *cmd[at:]]


@pytest.mark.e2e
def test_a_killed_rank_under_max_restarts_resumes_by_itself(tmp_path, data, whole):
    """Rank 1 is SIGKILLed before step 8 of the first attempt; torchrun starts the group again,
    which resumes from step 6's checkpoint and finishes: the losses of an uninterrupted run,
    with no second command. The restart says what failed; a grace shorter than the checkpoint
    write measured before it is reported at the restart."""
    path = recipe(tmp_path, data, **LONG)
    run = tmp_path / "run"
    env = dict(RESTARTS, RINGPATCH_FAULT="kill@8:rank=1:attempt=0")
    proc = subprocess.run(_with_restarts(command(path, 2, "--grace", "0.0001"), 1), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=HANG_S)  # fmt: skip
    ok(proc)
    out = proc.stdout + proc.stderr
    assert "restart 1 of 1 (torchrun --max-restarts): the previous worker group failed" in out, out[-4000:]
    assert "resuming from step 6" in out
    assert re.search(r"--grace 0.0001 s is shorter than the last checkpoint write, [\d.]+ s \(step 6\)", out), out[
        -4000:
    ]
    torch.testing.assert_close(torch.tensor(metrics(run)[0]), torch.tensor(whole), rtol=1e-6, atol=0)
    starts = [r for r in map(json.loads, (run / "metrics.jsonl").open()) if r.get("event") == "start"]
    assert [s["step"] for s in starts] == [0, 6] and "restart" in starts[1]


@pytest.mark.e2e
def test_a_failure_that_repeats_stops_after_the_restarts_naming_its_step(tmp_path, data):
    """A failure injected before step 5 of every attempt: torchrun --max-restarts 2 tries three
    times; the last attempt names the step and the rank of each, and the run ends, its
    checkpoint at step 3 intact for a resume once the cause is fixed."""
    path = recipe(tmp_path, data, parallel__sp=2, stages__0__steps=8, save_every=3)
    env = dict(RESTARTS, RINGPATCH_FAULT="raise@5:rank=1")
    proc = subprocess.run(_with_restarts(command(path, 2), 2), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=HANG_S)  # fmt: skip
    assert proc.returncode != 0
    err = proc.stderr
    found = re.search(r"ringpatch train \(rank 1\): the run failed at step 5 on every one of its 3 attempts "
                      r"\(torchrun --max-restarts 2\), so it is not restarted again: (.*)", err)  # fmt: skip
    assert found, err[-6000:]
    for attempt in (1, 2, 3):
        assert f"attempt {attempt}: step 5 (rank 1: RuntimeError: injected failure" in found[1]
    assert err.index("the run failed at step 5") < err.index("ChildFailedError")  # ours first
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step000000003"


FIELDS = ("loss", "lr", "tokens_per_s", "tokens_per_s_per_gpu", "step_s", "mfu", "mem_peak_gib", "mem_rss_gib",
          "mem_planned_gib", "slowest_rank", "slowest_lag_s",
          *(f"time_{p}_s" for p in ("data", "forward", "backward", "optimizer", "checkpoint")))  # fmt: skip


@pytest.mark.e2e
def test_every_logged_step_reports_itself_and_the_run_has_its_report(whole_run):
    """Each step of the uninterrupted run has every field; MFU is the plan's FLOPs over the step's
    time and the stated peak; the report's summary and plots exist and open."""
    from PIL import Image

    from ringpatch.plan.budget import step_flops
    from ringpatch.plan.preflight import preflight

    records = [json.loads(line) for line in (whole_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 33))
    for r in steps:
        assert all(isinstance(r.get(k), (int, float)) for k in FIELDS), sorted(set(FIELDS) - set(r))
        assert r["slowest_rank"] in (0, 1) and r["slowest_lag_s"] >= 0 and 0 < r["mfu"] < 1
    start = next(r for r in records if r.get("event") == "start")
    assert start["peak_tflops"] > 0 and "measured on this CPU" in start["peak_source"]
    plan = preflight(str(next(whole_run.parent.glob("recipe-*.yaml"))), world=2)
    for r in steps[:3]:
        flops = step_flops(plan, r["stage"])
        assert r["mfu"] == pytest.approx(flops / r["step_s"] / (start["peak_tflops"] * 1e12), rel=1e-9)
    saved = [r for r in steps if r["step"] in (3, 6, 9)]
    assert all(r["time_checkpoint_s"] > 0 for r in saved)
    summary = json.loads((whole_run / "report" / "summary.json").read_text())
    assert summary["steps"] == 32 and summary["loss_last"] == steps[-1]["loss"]
    assert summary["mem_peak_gib_max"] == max(r["mem_peak_gib"] for r in steps)
    for name in ("loss.png", "tokens_per_s.png", "mfu.png", "memory.png"):
        with Image.open(whole_run / "report" / name) as image:
            assert image.size[0] > 100 and image.size[1] > 100


@pytest.mark.unit
def test_memory_over_the_plan_is_warned_once_per_stage():
    from ringpatch.train.telemetry import MemoryPeak

    memory = MemoryPeak(torch.device("cpu"))
    assert memory.over_plan(0, 1.09, 1.0) is None
    warning = memory.over_plan(0, 1.25, 1.0)
    assert "peak resident (VmHWM) memory 1.25 GiB is 1.25x the plan's 1.00 GiB" in warning
    assert memory.over_plan(0, 1.5, 1.0) is None and memory.over_plan(1, 1.5, 1.0) is not None
    plan = SimpleNamespace(tensors=0.035, reserve={"process runtime (CPU)": 0.55})
    assert "(tensors 0.035 + process runtime (CPU) 0.55)" in memory.over_plan(2, 0.77, 0.585, memory.parts(plan))
    assert memory.read()["mem_peak_gib"] > 0


@pytest.mark.unit
def test_max_restarts_without_checkpoints_is_refused_before_start(tmp_path, data, capsys, monkeypatch):
    from ringpatch.cli import main as cli
    from ringpatch.train.command import main

    path = str(recipe(tmp_path, data, save_every=0))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's agent, as it sets its workers' environment
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    assert main(["--recipe", path]) == 2
    assert "torchrun --max-restarts 2 restarts a failed run from its latest checkpoint, but the recipe has " \
        "save_every: 0" in capsys.readouterr().err  # fmt: skip
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # torchrun's default: the store is shared
    assert main(["--recipe", str(recipe(tmp_path, data, save_every=2))]) == 2
    assert "set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment" in capsys.readouterr().err
    monkeypatch.delenv("TORCHELASTIC_MAX_RESTARTS")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert cli(["plan", "--recipe", path, "--nodes", "1", "--gpus-per-node", "1", "--max-restarts", "1"]) == 2
    assert "save_every: 0" in capsys.readouterr().err
    assert cli(["plan", "--recipe", path, "--nodes", "1", "--gpus-per-node", "1"]) == 0


@pytest.mark.unit
@pytest.mark.parametrize("text", ["kill", "raise@x", "boom@3", "kill@3:rank=", "kill@3:node=1"])
def test_a_malformed_fault_injection_is_refused(text, monkeypatch):
    from ringpatch.train.restart import Fault

    monkeypatch.setenv("RINGPATCH_FAULT", text)
    with pytest.raises(ValueError, match="is not ACTION@STEP"):
        Fault.from_env()


@pytest.mark.unit
def test_an_existing_stop_file_is_refused_before_start(tmp_path, data, capsys):
    from ringpatch.train.command import main

    stop = tmp_path / "stop"
    stop.touch()
    assert main(["--recipe", str(recipe(tmp_path, data)), "--stop-file", str(stop)]) == 2
    assert "exists already, so the run would stop after one step" in capsys.readouterr().err


@pytest.mark.unit
def test_the_request_is_noted_and_the_previous_handlers_come_back():
    from ringpatch.train.stop import StopRequest

    before = signal.getsignal(signal.SIGUSR1)
    request = StopRequest()
    try:
        assert not request.pending
        os.kill(os.getpid(), signal.SIGUSR1)
        assert request.pending and request.reason() == "SIGUSR1 on at least one rank"
    finally:
        request.close()
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.mark.e2e
def test_slurm_script_stops_the_run_on_its_signal_and_requeues(tmp_path):
    """With stand-ins for srun, scontrol and torchrun: SIGUSR1 to the batch script (what
    --signal=B:USR1@600 sends before the time limit) creates the stop file the trainer watches;
    the run exits 75 and the script requeues its job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "scontrol": 'if [ "$1" = requeue ]; then echo "requeue $2" > "$OUT.requeue"; else printf "gpu-a1\\n"; fi',
        # one node's torchrun: the batch script gets its signal while the run trains; the run stops
        # when the stop file it was given appears, and exits 75 as the trainer does
        "srun": 'while [[ "$1" == --* ]]; do shift; done; echo "$@" > "$OUT"\n'
        'stop="${@: -1}"; kill -USR1 $PPID\n'
        'for i in $(seq 600); do [ -f "$stop" ] && exit 75; sleep 0.1; done; exit 1',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    stop = tmp_path / "job.stop"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-a1", SLURM_NNODES="1",
               SLURM_JOB_ID="77", SLURM_GPUS_ON_NODE="8", OUT=str(tmp_path / "cmd"), TORCHRUN="torchrun",
               STOP_FILE=str(stop))  # fmt: skip
    script = (ROOT / "launch/slurm/finetune.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@600" in script and "#SBATCH --requeue" in script
    proc = subprocess.run(["bash", "launch/slurm/finetune.sbatch", "recipes/llama3-8b-1m.yaml"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=HANG_S)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SIGUSR1 before the time limit: asking every rank to checkpoint its step and stop" in proc.stdout
    assert "requeueing job 77" in proc.stdout
    assert (tmp_path / "cmd.requeue").read_text().split() == ["requeue", "77"]
    assert (tmp_path / "cmd").read_text().split()[-2:] == ["--stop-file", str(stop)]
    assert "--max-restarts 3 " in (tmp_path / "cmd").read_text()  # a failed rank restarts the group (MAX_RESTARTS)
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in script
    assert not stop.exists()


@pytest.mark.e2e
def test_a_run_folder_deleted_under_the_run_stops_every_rank_with_one_line(tmp_path, data):
    """run_dir removed mid-run (rm -rf, a sync tool): the ranks stop at the next step, exit 2, one
    line from rank 0 naming the folder, instead of writing into nothing and ending with exit 0.
    The run is held (SIGSTOP) while the folder goes, so it is mid-run on any machine."""
    import shutil

    path = recipe(tmp_path, data, **LONG)
    run = tmp_path / "run"
    proc, err = _held_at_first_checkpoint(command(path, 2), path, run, lambda proc: shutil.rmtree(run))
    assert proc.returncode != 0, err[-3000:]
    assert "exitcode  : 2" in err, err[-3000:]  # each worker's, as torchrun reports it
    stopped = [line for line in err.splitlines() if "was deleted while the run was running" in line]
    assert len(stopped) == 1 and stopped[0].startswith(f"ringpatch train: run_dir {run} was deleted"), err[-3000:]
    assert "Traceback" not in err or err.index(stopped[0]) < err.index("Traceback")  # ours first: torchrun's after


@pytest.mark.unit
def test_a_rank_waiting_for_its_group_is_left_to_sigterm(tmp_path, data, monkeypatch):
    """Until the process group is up the trainer leaves SIGTERM to its default, so a rank waiting
    for peers that will never come (rank 0 refused to start, say) ends when the launcher stops it,
    not 30 s later at the launcher's SIGKILL; from then on the stop request takes it (and restores
    the previous handler when the trainer closes)."""
    from ringpatch.plan.preflight import preflight
    from ringpatch.train import loop

    seen = {}

    def waiting(plan):
        seen["handler"] = signal.getsignal(signal.SIGTERM)
        raise RuntimeError("the group never forms")

    monkeypatch.setattr(loop, "start_distributed", waiting)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="the group never forms"):
        loop.Trainer(preflight(str(recipe(tmp_path, data)), world=1))
    assert seen["handler"] is before is signal.SIG_DFL and signal.getsignal(signal.SIGTERM) is before
