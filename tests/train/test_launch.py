"""The launch paths users type: make finetune-1m (plan, refusal without GPUs) and the SLURM script."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from tests.helpers import HANG_S, ROOT

pytestmark = pytest.mark.e2e


def _make(*args, env=None):
    return subprocess.run(
        ["make", "-s", "finetune-1m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_S,
        env=dict(os.environ, **(env or {})),
    )


def test_finetune_1m_dry_run_prints_the_plan_and_command():
    proc = _make("DRY_RUN=1", "MASTER_ADDR=head0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "world 32 = dp 1 x sp 32 (ulysses 4 x ring 8) x tp 1" in out and "ZeRO-3" in out
    assert "ulysses  4 x ring   8:" in out and "<- recipe, recommended" in out
    assert "4  1048576      100            1       32768        28,497.1  theta 69,123,823" in out  # TFLOP/GPU/step
    assert "launch: " in out and "--recipe recipes/llama3-8b-1m.yaml" in out
    assert "--max-restarts 3" in out and "--grace 600" in out
    assert ("sbatch --nodes 4" in out) or ("--nnodes 4 --nproc_per_node 8" in out and "head0:29500" in out)


def test_finetune_1m_on_one_node_picks_the_one_node_recipe():
    proc = _make("DRY_RUN=1", "NODES=1", "MASTER_ADDR=head0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 8 = dp 1 x sp 8 x tp 1" in proc.stdout and "layer inputs offloaded to host memory" in proc.stdout
    assert "--recipe recipes/llama3-8b-1m-1node.yaml" in proc.stdout


def test_finetune_1m_plan_refuses_a_world_the_recipe_cannot_use():
    proc = _make("DRY_RUN=1", "NODES=3")
    assert proc.returncode != 0 and "world size 24 is not divisible by sp*tp = 32*1 = 32" in proc.stderr


def test_finetune_1m_without_gpus_stops_with_a_message():
    if torch.cuda.device_count() >= 8:
        pytest.skip("a node with 8 GPUs would start the run")
    if subprocess.run(["bash", "-c", "command -v sbatch"], capture_output=True).returncode == 0:
        pytest.skip("with SLURM present the target submits the job")
    proc = _make()
    assert proc.returncode != 0
    assert "finetune-1m needs 4 nodes x 8 GPUs" in proc.stderr and "make finetune-1m DRY_RUN=1" in proc.stderr


def test_slurm_script_runs_torchrun_per_node_with_a_rendezvous_on_the_first(tmp_path):
    """With stand-ins for srun, scontrol and torchrun, the script builds the command each node runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "scontrol": 'printf "gpu-a1\\ngpu-a2\\n"',
        "srun": 'while [[ "$1" == --* ]]; do shift; done; exec "$@"',  # run the command once, as one node would
        "torchrun": 'echo "torchrun $*" > "$OUT"',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_NODELIST="gpu-a[1-2]",
        SLURM_NNODES="2",
        SLURM_JOB_ID="77",
        SLURM_GPUS_ON_NODE="8",
        OUT=str(tmp_path / "cmd"),
        TORCHRUN=str(bin_dir / "torchrun"),
        STOP_FILE=str(tmp_path / "stop"),
    )
    proc = subprocess.run(
        ["bash", "launch/slurm/finetune.sbatch", "recipes/llama3-8b-1m.yaml", "--no-resume"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cmd").read_text().split() == [
        "torchrun", "--nnodes", "2", "--nproc_per_node", "8", "--max-restarts", "3", "--rdzv_id", "77", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "gpu-a1:29500", "-m", "ringpatch.train", "--recipe", "recipes/llama3-8b-1m.yaml", "--stop-file", str(tmp_path / "stop"), "--no-resume",
    ]  # fmt: skip
