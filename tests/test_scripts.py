"""The prepared scripts keep working: gpu_check's code path on CPU, and its no-CUDA exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import HANG_S, ROOT

pytestmark = pytest.mark.e2e


def test_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "g.json"
    cmd = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    cases = ("full", "causal", "window", "w-edge", "varlen-causal", "varlen-full")
    kernels = {f"torch/float32/d{d}/{c}" for d in (128, 36) for c in cases}
    assert kernels | {"torch/throughput", "torch/ring P=4 zigzag causal", "real ring", "memory"} <= set(report)
    assert set(report["real ring"]) == {"one head group", "K/V head groups in turn", "packed documents"}
    # the memory check's code path: every switch measured (live tensors on CPU) against the planner
    # llama3-8b-1m-1node: offload + 16 MLP tiles + chunked norms, the one-node recipes' binding configuration
    configurations = ("ckpt", "keep_attention", "offload", "offload+tiles8", "llama3-8b-256k-1node",
                      "llama3-8b-1m-1node")  # fmt: skip
    assert {f"{c} S=2048" for c in configurations} == set(report["memory"])
    assert all(0.85 <= row["ratio"] <= 1.15 for row in report["memory"].values()), report["memory"]
    assert all(row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 for row in report["memory"].values())
    memory = report["memory"]
    assert memory["offload S=2048"]["loss"] == memory["ckpt S=2048"]["loss"]  # checked: "loss = checkpointing's"
    assert "ok   memory offload S=2048 loss = checkpointing's" in proc.stdout
    # DeepSpeed's ZeRO-3 buffers read from its engine against the plan's (DeepSpeed is installed here)
    phases = ("loss", "final_norm", "layer", "embedding")
    assert set(report["zero"]) == {"bucket"} | {f"gathered {p}" for p in phases}
    assert all(0 < row["measured_bytes"] <= row["planned_bytes"] for row in report["zero"].values())
    assert "0 failure(s) in 36 checks" in proc.stdout and "summary" in proc.stdout


def test_gpu_check_without_cuda_exits_zero():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the check would run")
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py"], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S
    )
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout, proc.stdout + proc.stderr


def test_selfcheck_runs_every_case_on_two_ranks():
    """`make selfcheck`'s command (what a 2-GPU machine runs with NCCL), on CPU: the ring's output and
    gradients against float64 attention for one sequence, packed documents and K/V head groups."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, "-m", "ringpatch.selfcheck", "--seq", "512"], cwd=ROOT, capture_output=True, text=True,
        timeout=HANG_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for case in ("one sequence", "packed documents", "K/V head groups in turn"):
        assert f"ok     {case}" in proc.stdout, proc.stdout
