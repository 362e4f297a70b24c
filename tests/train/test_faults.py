"""Faults a long run meets: damaged checkpoints, a full disk, a stopped rank, non-finite weights.
Each run either continues with the losses of an uninterrupted run or stops with its message."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ringpatch.train import checkpoint
from tests.helpers.procs import spawn
from tests.helpers.trainrun import ENV, ROOT, command, launch, ok, recipe, wait_for

pytestmark = pytest.mark.e2e


def _damage(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "bytes":  # 4 KB overwritten in place: same size, other content
        start = len(raw) // 2
        raw[start : start + 4096] = bytes((b + 1) % 256 for b in raw[start : start + 4096])
    else:  # truncated to half
        raw = raw[: len(raw) // 2]
    path.write_bytes(bytes(raw))


def _largest(folder: Path) -> Path:
    return max((p for p in folder.iterdir() if p.suffix == ".pt"), key=lambda p: p.stat().st_size)


def test_damaged_checkpoints_fall_back_to_the_newest_intact_one(tmp_path, data):
    """Corrupted bytes, a truncated shard, `latest` naming a missing tag: each resume skips what is
    damaged, says so, starts from the newest intact checkpoint, and recomputes the steps after it
    with the losses they had the first time. keep_last bounds the checkpoints kept."""
    path = recipe(tmp_path, data, parallel__sp=2, stages=[{"seq_len": 64, "steps": 5}], save_every=2, keep_last=2)
    ckpt = tmp_path / "run" / "checkpoints"

    def losses() -> dict[int, float]:
        return {
            r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open()) if "loss" in r
        }

    ok(launch(path, 2, "--max-steps", "4"))
    first = losses()
    assert (ckpt / "latest").read_text() == "step000000004" and sorted(first) == [1, 2, 3, 4]
    _damage(_largest(ckpt / "step000000004"), "bytes")
    proc = launch(path, 2, "--max-steps", "5")
    ok(proc)
    assert f"skipping checkpoint {ckpt / 'step000000004'}: " in proc.stdout
    assert "differs from what was written (sha256)" in proc.stdout
    assert f"resuming from {ckpt / 'step000000002'}, the newest intact checkpoint" in proc.stdout
    second = losses()
    assert [second[s] for s in (1, 2, 3, 4)] == pytest.approx([first[s] for s in (1, 2, 3, 4)], rel=1e-6, abs=0)

    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step000000004", "step000000005"]  # keep_last
    _damage(_largest(ckpt / "step000000005"), "truncate")
    (ckpt / "latest").write_text("step000000009")  # a tag that does not exist
    proc = launch(path, 2)
    ok(proc)
    assert f"skipping checkpoint {ckpt / 'step000000009'}: its folder does not exist" in proc.stdout
    assert f"skipping checkpoint {ckpt / 'step000000005'}: " in proc.stdout and "bytes, " in proc.stdout
    assert f"resuming from {ckpt / 'step000000004'}" in proc.stdout
    assert losses()[5] == pytest.approx(second[5], rel=1e-6, abs=0) and (tmp_path / "run" / "final").is_dir()

    for tag in [p for p in ckpt.iterdir() if p.is_dir()]:  # every checkpoint damaged: a message, not a restart
        _damage(_largest(tag), "truncate")
    proc = launch(path, 2)
    assert proc.returncode != 0 and "holds no intact checkpoint (step000000005: " in proc.stderr
    # ours comes first; what follows is torchrun's own ChildFailedError report
    assert proc.stderr.index("holds no intact checkpoint") < proc.stderr.find("Traceback") % len(proc.stderr)


def test_a_full_disk_stops_with_a_message_and_keeps_no_partial_checkpoint(tmp_path, data):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        path = recipe(tmp_path, data, parallel__sp=2, stages=[{"seq_len": 64, "steps": 3}], run_dir=str(mount / "run"))
        proc = launch(path, 2)
        assert proc.returncode != 0
        assert "could not be written (rank " in proc.stderr and "the disk is full" in proc.stderr
        assert "it was removed and no checkpoint stays the latest: free disk space" in proc.stderr
        ckpt = mount / "run" / "checkpoints"
        assert not (ckpt / "latest").exists() and not [p for p in ckpt.iterdir() if p.is_dir()]
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@contextlib.contextmanager
def _tmpfs(mount: Path, size: str = "64m"):
    mount.mkdir(parents=True, exist_ok=True)
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_read_only_checkpoint_folder_stops_every_rank_with_its_cause(tmp_path, data):
    """The checkpoints' filesystem turns read-only between two launches (as root, permission bits do
    not stop a write; a read-only mount does): the next save fails on rank 0, every rank stops at
    once naming it, and the checkpoint already written stays the latest."""
    path = recipe(tmp_path, data, parallel__sp=2, stages=[{"seq_len": 64, "steps": 6}], save_every=2)
    with _tmpfs(tmp_path / "run" / "checkpoints") as ckpt:
        ok(launch(path, 2, "--max-steps", "2"))
        assert (ckpt / "latest").read_text() == "step000000002"
        subprocess.run(["mount", "-o", "remount,ro", str(ckpt)], check=True)
        started = time.monotonic()
        proc = launch(path, 2)
        seconds = time.monotonic() - started
    assert proc.returncode != 0
    message = (
        f"checkpoint folder {ckpt / 'step000000004'} could not be written (rank 0: OSError: Read-only file system)"
    )
    assert message in proc.stderr and "step000000002 stays the latest: make" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.index(message) < proc.stderr.find("Traceback") % len(proc.stderr)
    assert seconds < 5 * 60  # stopped with its cause, not after the ranks' timeout


def test_a_manifest_that_vouches_for_nothing_is_damaged(tmp_path, data):
    """A manifest without `files`, or with an empty one, cannot vouch for its checkpoint: resume
    skips it, says why, and continues from the older intact one with the same losses."""
    path = recipe(tmp_path, data, parallel__sp=2, stages=[{"seq_len": 64, "steps": 5}], save_every=2, keep_last=0)
    ckpt = tmp_path / "run" / "checkpoints"
    ok(launch(path, 2, "--max-steps", "4"))
    before = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    (ckpt / "step000000004" / checkpoint.MANIFEST).write_text(json.dumps({"step": 4}))  # the others: below
    proc = launch(path, 2, "--max-steps", "4")
    ok(proc)
    assert f"skipping checkpoint {ckpt / 'step000000004'}: its {checkpoint.MANIFEST} lists no files" in proc.stdout
    assert f"resuming from {ckpt / 'step000000002'}, the newest intact checkpoint" in proc.stdout
    after = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open()) if "loss" in r}
    assert [after[s] for s in (3, 4)] == pytest.approx(
        [r["loss"] for r in before if r.get("step") in (3, 4) and "loss" in r], rel=1e-6
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    "manifest,why",
    [
        ([], "has no integer step"),
        ({"files": {}}, "has no integer step"),
        ({"step": "4", "files": {}}, "has no integer step"),
        ({"step": 4}, "lists no files"),
        ({"step": 4, "files": {}}, "lists no files"),
        ({"step": 4, "files": ["a.pt"]}, "lists no files"),
        ({"step": 4, "files": {"a.pt": {"size": 3}}}, "entry for 'a.pt' has no size and sha256"),
        ({"step": 4, "files": {"a.pt": {"size": "3", "sha256": "0" * 64}}}, "entry for 'a.pt' has no size"),
        ({"step": 4, "files": {"a.pt": {"size": 3, "sha256": "0" * 63}}}, "entry for 'a.pt' has no size"),
        ({"step": 4, "files": {"a.pt": {"size": 3, "sha256": "0" * 64}}}, "does not list ['b.pt']"),
    ],
)
def test_a_manifest_that_cannot_vouch_for_its_folder_is_refused(manifest, why):
    problem = checkpoint.manifest_problem(manifest, ["a.pt", "b.pt"])
    assert problem is not None and why in problem, problem


@pytest.mark.unit
def test_a_manifest_listing_every_file_with_size_and_hash_vouches():
    entry = {"size": 3, "sha256": "0" * 64}
    assert checkpoint.manifest_problem({"step": 4, "files": {"a.pt": entry, "b.pt": entry}}, ["a.pt", "b.pt"]) is None


def test_a_full_disk_while_preparing_stops_with_one_line_and_removes_the_partial_copy(tmp_path, data):
    """The data cache's disk fills while rank 0 prepares: every rank stops naming it, and no
    .partial folder is left filling the disk."""
    with _tmpfs(tmp_path / "cache", "200k") as cache:
        path = recipe(tmp_path, data, parallel__sp=2, data__cache_dir=str(cache))
        proc = launch(path, 2)
        assert proc.returncode != 0
        assert f"the disk holding {cache} is full while preparing" in proc.stderr, proc.stderr[-3000:]
        assert "the partial copy" in proc.stderr and "was removed" in proc.stderr
        assert not list(cache.glob("*.partial"))


def test_a_stopped_rank_is_named_after_timeout_minutes(tmp_path, data):
    """SIGSTOP one rank mid-run: the other rank's collective times out after timeout_minutes and
    the job ends with a message naming the stopped rank."""
    path = recipe(tmp_path, data, parallel__sp=2, stages=[{"seq_len": 64, "steps": 200}], timeout_minutes=0.15)
    proc = subprocess.Popen(command(path, 2), cwd=ROOT, env=ENV, text=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    metrics_file = tmp_path / "run" / "metrics.jsonl"
    wait_for(lambda: metrics_file.is_file() and metrics_file.read_text().count("\n") >= 2, "two logged steps")
    pids = subprocess.run(["pgrep", "-f", "--", f"ringpatch.train --recipe {path}"], capture_output=True, text=True)
    workers = sorted(int(p) for p in pids.stdout.split() if int(p) != proc.pid)
    rank1 = [p for p in workers if Path(f"/proc/{p}/environ").read_bytes().find(b"\0RANK=1\0") >= 0]
    assert rank1, workers
    os.kill(rank1[0], signal.SIGSTOP)
    stopped_at, message = time.time(), ""
    try:
        for line in proc.stderr:  # until rank 0's message (torchrun then waits 30 s on the stopped rank)
            if line.startswith("ringpatch train (rank"):
                message = line
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", "--", f"--recipe {path}"], check=False)
        proc.wait()
    assert message.startswith("ringpatch train (rank 0): rank 1 (silent for "), message
    assert "stopped making progress; this rank waited 0.15 minutes (timeout_minutes)" in message
    # named at timeout_minutes (9 s), not at the 5-minute default; the bound leaves a loaded machine 20x
    assert time.time() - stopped_at < 180


def _save_nonfinite(rank, world, folder):
    class Engine:
        device = torch.device("cpu")
        module = torch.nn.Linear(2, 2)

    with torch.no_grad():
        Engine.module.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"the weights are not finite after step 7 \(norm inf\)"):
        checkpoint.save(Engine(), folder, 7, {}, {})
    assert not Path(folder).exists()  # nothing written, `latest` untouched


@pytest.mark.multiprocess
def test_non_finite_weights_are_never_checkpointed(tmp_path):
    spawn(_save_nonfinite, 2, str(tmp_path / "checkpoints"))


@pytest.mark.unit
def test_resume_refuses_what_fixes_a_run_and_reports_what_changed():
    from ringpatch.plan.recipe import from_dict, Recipe  # noqa: I001

    base = {"model": {"name": "m"}, "stages": [{"seq_len": 64, "steps": 4}, {"seq_len": 128, "steps": 4}]}
    saved = checkpoint.recipe_record(from_dict(Recipe, base), 2)

    def record(**changes):
        r = json.loads(json.dumps(base))
        r.update(changes)
        return checkpoint.recipe_record(from_dict(Recipe, r), 2)

    changed = checkpoint.resume_changes(saved, record(optim={"lr": 1e-3}, log_every=5), 0, 2)
    assert changed == {"optim.lr": (2e-5, 1e-3), "log_every": (1, 5)}
    longer = record(stages=[{"seq_len": 64, "steps": 6}, {"seq_len": 128, "steps": 4}])
    assert checkpoint.resume_changes(saved, longer, 0, 2)["stages[0]"][1]["steps"] == 6
    cases = [
        (record(seed=1), 0, 2, "seed: checkpoint 0, recipe 1"),
        (record(parallel={"layout": "zigzag"}), 0, 2, "parallel.layout: checkpoint 'balanced', recipe 'zigzag'"),
        (record(stages=[{"seq_len": 32, "steps": 4}, {"seq_len": 128, "steps": 4}]), 0, 2, "stages[0].seq_len"),
        (record(stages=[{"seq_len": 64, "steps": 1}, {"seq_len": 128, "steps": 4}]), 0, 2, "stage 0 now spans"),
        (checkpoint.recipe_record(from_dict(Recipe, base), 4), 0, 2, "world: checkpoint 2, recipe 4"),
    ]
    for current, stage, step, match in cases:
        with pytest.raises(ValueError, match="what a resumed run cannot change") as e:
            checkpoint.resume_changes(saved, current, stage, step)
        assert match in str(e.value)
    # Ulysses x ring or the ring alone: the same math and the same ZeRO partition (dp x sp), reported
    ring = dict(base, parallel={"sp": 2})
    saved_ring = checkpoint.recipe_record(from_dict(Recipe, ring), 2)
    hybrid = checkpoint.recipe_record(from_dict(Recipe, dict(base, parallel={"sp": 2, "ulysses": 2})), 2)
    assert checkpoint.resume_changes(saved_ring, hybrid, 0, 2) == {"parallel.ulysses": (1, 2)}
    # a stage not begun yet may change in every way
    later = record(stages=[{"seq_len": 64, "steps": 4}, {"seq_len": 256, "steps": 9, "rope_theta": 5e5}])
    assert "stages[1]" in checkpoint.resume_changes(saved, later, 0, 4)


def test_a_resume_after_the_data_changed_names_the_change(tmp_path, data):
    """The training file grows between two launches: the resumed run stops, saying the data changed
    since the checkpoint (not that a sampler's sizes differ), and the checkpoint stays."""
    own = tmp_path / "data"
    own.mkdir()
    train = own / "train.jsonl"
    train.write_text((data / "train.jsonl").read_text())
    path = recipe(tmp_path, data, parallel__sp=2, stages=[{"seq_len": 64, "steps": 4}], save_every=2,
                  data__source=str(train))  # fmt: skip
    ok(launch(path, 2, "--max-steps", "2"))
    with train.open("a") as f:
        f.write(json.dumps({"text": "a new document " * 40}) + "\n")
    proc = launch(path, 2)
    assert proc.returncode != 0
    assert (
        "the training data of stages[0] changed since the checkpoint at step 2 (prepared then as train-64-"
        in proc.stderr
    )
    assert "restore the data, or start a new run_dir" in proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step000000002"


def test_a_rank_waiting_for_the_data_names_a_preparing_rank_that_stopped(monkeypatch):
    """The ranks that wait for rank 0's preparation look at its heartbeat between waits on the
    store: a silent rank 0 is named, not waited for a day."""
    from datetime import timedelta

    import torch.distributed as dist

    from ringpatch.data import prepare

    monkeypatch.setattr(prepare, "WAIT_CHECK", 0.05)
    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=1))
    looks = []

    def waiting():
        looks.append(1)
        if len(looks) == 3:
            raise RuntimeError("rank 0 stopped making progress while preparing the data (silent for 40 s)")

    with pytest.raises(RuntimeError, match="rank 0 stopped making progress while preparing the data"):
        prepare._wait_for(store, "ringpatch/prepared/x", waiting)
    assert len(looks) == 3
    store.set("ringpatch/prepared/y", "failed: the disk is full")
    with pytest.raises(prepare.DataError, match="rank 0 could not prepare the data \\(the disk is full\\)"):
        prepare._wait_for(store, "ringpatch/prepared/y", waiting)
