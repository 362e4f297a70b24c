"""Stopping on request (ringpatch/train/stop.py): SIGTERM through the launcher checkpoints the
step every rank agrees on and exits 75; the same command resumes to an uninterrupted run's
losses; a stop file does the same; the SLURM script asks for its signal and requeues."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest
import torch

from tests.helpers import HANG_S
from tests.helpers.trainrun import ENV, ROOT, command, hold, launch, metrics, ok, recipe, wait_for

LONG = {"parallel__sp": 2, "stages__0__steps": 30, "save_every": 3}


@pytest.fixture(scope="module")
def whole(tmp_path_factory, data):
    """The uninterrupted run's losses."""
    folder = tmp_path_factory.mktemp("whole")
    ok(launch(recipe(folder, data, **LONG), 2))
    return metrics(folder / "run")[0]


def _resumes_to_the_same_losses(path, run, step: int, whole) -> None:
    assert (run / "checkpoints" / "latest").read_text() == f"step{step:09d}"
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "stopped" and e["step"] == step for e in events), events
    assert not (run / "final").exists()
    resumed = launch(path, 2)
    ok(resumed)
    assert f"resuming {run / 'checkpoints'} at step {step}" in resumed.stdout + resumed.stderr
    torch.testing.assert_close(torch.tensor(metrics(run)[0]), torch.tensor(whole), rtol=1e-6, atol=0)


@pytest.mark.e2e
def test_sigterm_to_the_launcher_checkpoints_the_step_and_the_same_command_resumes(tmp_path, data, whole):
    """torchrun passes a SIGTERM on to its workers; they agree, checkpoint the step they are at and
    exit 75. The run is held (SIGSTOP) at its first checkpoint while the signal is sent, so it
    is mid-run however fast or slow the machine is."""
    path = recipe(tmp_path, data, **LONG)
    run = tmp_path / "run"
    proc = subprocess.Popen(command(path, 2), cwd=ROOT, env=ENV, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    wait_for(lambda: (run / "checkpoints" / "latest").is_file(), "the first checkpoint")
    hold(path)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher is asked to end, as a scheduler or scancel would
    hold(path, signal.SIGCONT)
    out, err = proc.communicate(timeout=HANG_S)
    found = re.search(
        r"stopped on request \(SIGTERM on at least one rank\) after step (\d+), which is checkpointed", err
    )
    assert found, err[-4000:]
    step = int(found[1])
    assert 3 <= step < 30
    _resumes_to_the_same_losses(path, run, step, whole)


@pytest.mark.e2e
def test_a_stop_file_stops_the_run_at_the_step_it_appears_in(tmp_path, data, whole):
    path = recipe(tmp_path, data, **LONG)
    run, stop = tmp_path / "run", tmp_path / "stop"
    proc = subprocess.Popen(command(path, 2, "--stop-file", str(stop)), cwd=ROOT, env=ENV, start_new_session=True,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    wait_for(lambda: (run / "checkpoints" / "latest").is_file(), "the first checkpoint")
    hold(path)
    stop.touch()
    hold(path, signal.SIGCONT)
    out, err = proc.communicate(timeout=HANG_S)
    assert "exitcode  : 75" in err, err[-4000:]  # torchrun reports the workers' "resume me"
    found = re.search(rf"stopped on request \({re.escape(str(stop))} exists\) after step (\d+)", err)
    assert found, err[-4000:]
    assert not stop.exists()  # honoured, then removed: the next run does not stop at once
    _resumes_to_the_same_losses(path, run, int(found[1]), whole)


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
    assert not stop.exists()
