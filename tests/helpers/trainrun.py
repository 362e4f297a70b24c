"""Helpers for trainer tests: a tiny recipe on a small generated corpus, and launching it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.helpers import HANG_S, ROOT

BIN = Path(sys.executable).parent


def corpus(folder: Path) -> Path:
    from ringpatch.data.corpus import write_corpus

    if not (folder / "train.jsonl").is_file():
        write_corpus(folder, train_docs=60, eval_docs=4, chars=(800, 2500), eval_chars=2500, seed=1)
    return folder


def recipe(tmp: Path, data: Path, **changes) -> Path:
    """A tiny-Llama recipe (2 stages: 64 then 128 tokens) with `changes` applied (dotted keys)."""
    r = {
        "model": {"name": "tiny", "init": "scratch", "tokenizer": "bytes", "dtype": "float32",
                  "config": {"model_type": "llama", "vocab_size": 258, "hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 64, "tie_word_embeddings": False}},
        "parallel": {"sp": 1, "tp": 1},
        "zero": {"stage": 2},
        "optim": {"lr": 0.003, "warmup_steps": 1},
        "micro_batch": 2,
        "stages": [{"seq_len": 64, "steps": 3}, {"seq_len": 128, "steps": 2, "rope_theta": 21000.0, "micro_batch": 1}],
        "data": {"source": str(data / "train.jsonl"), "eval_source": str(data / "eval.jsonl"), "eval_samples": 2,
                 "cache_dir": str(data / "cache")},
        "run_dir": str(tmp / "run"),
        "save_every": 2,
    }  # fmt: skip
    for dotted, value in changes.items():
        node, *path = dotted.split("__")
        target = r
        for key in [node, *path][:-1]:
            target = target[int(key)] if isinstance(target, list) else target.setdefault(key, {})
        last = [node, *path][-1]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    path = tmp / f"recipe-{len(list(tmp.glob('recipe-*.yaml')))}.yaml"
    # atomic: ranks of one spawned group may write the same recipe while another reads it
    part = path.with_name(f".{path.name}.{os.getpid()}")
    part.write_text(yaml.safe_dump(r))
    os.replace(part, path)
    return path


# 4-rank grids run on 2-core machines on purpose
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", RINGPATCH_OVERSUBSCRIBE="1")


def command(recipe_path: Path, nproc: int, *extra: str, launcher: str = "torchrun") -> list[str]:
    """The command line that starts the trainer under `launcher`."""
    module = ["-m", "ringpatch.train", "--recipe", str(recipe_path), *extra]
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *module]
    elif launcher == "deepspeed":
        cmd = [
            str(BIN / "deepspeed"),
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(free_port()),
            "--module",
            "ringpatch.train",
            "--recipe",
            str(recipe_path),
            *extra,
        ]
    elif launcher == "accelerate":
        cmd = [
            str(BIN / "accelerate"),
            "launch",
            "--config_file",
            str(ROOT / "launch/accelerate/cpu-2proc.yaml"),
            "--num_processes",
            str(nproc),
            "--main_process_port",
            str(free_port()),
            *module,
        ]
    elif launcher == "python":
        cmd = [sys.executable, *module]
    else:
        raise ValueError(launcher)
    return cmd


def _shm_workspaces() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def launch(recipe_path: Path, nproc: int, *extra: str, launcher: str = "torchrun", timeout: int = HANG_S):
    """Run the trainer under a launcher; returns the CompletedProcess. The run must leave none of
    DeepSpeed's CPU all-reduce workspaces in /dev/shm (ringpatch.parallel.unlink_deepspeed_shm)."""
    cmd = command(recipe_path, nproc, *extra, launcher=launcher)
    before = _shm_workspaces()
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    leaked = _shm_workspaces() - before
    assert not leaked, f"the run left {sorted(leaked)} in /dev/shm"
    return proc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(run_dir: Path) -> tuple[list[float], list[dict]]:
    """(training losses by step, eval records) from run_dir/metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], [r for r in records if r.get("event") == "eval"]


def wait_for(condition, what: str, limit_s: float = 900) -> None:
    """Poll `condition` until it holds. The limit only catches a hang (a loaded machine may be many
    times slower than an idle one); the outcome of a test never depends on how soon it holds."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {limit_s:.0f} s for {what}"
        time.sleep(0.02)


def run_pids(recipe_path: Path) -> list[int]:
    """The processes of a trainer launch (launcher and workers) by their command line: torchrun's
    workers live in sessions of their own."""
    found = subprocess.run(["pgrep", "-f", "--", f"--recipe {recipe_path}"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def hold(recipe_path: Path, sig: int = signal.SIGSTOP) -> list[int]:
    """Send `sig` to every process of a launch (SIGSTOP holds a run where it is, whatever the
    machine's speed; SIGCONT lets it go on). Returns the pids."""
    pids = run_pids(recipe_path)
    assert pids, f"no process runs --recipe {recipe_path}"
    for pid in pids:
        os.kill(pid, sig)
    return pids


def ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
