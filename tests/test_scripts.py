"""The prepared scripts keep working: gpu_check's code path on CPU, and its no-CUDA exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT

pytestmark = pytest.mark.e2e


def test_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "g.json"
    cmd = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--seq", "512", "--block", "64", "--world", "2"]
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert {"torch/full", "torch/causal", "torch/window", "torch/w-edge", "torch/throughput"} <= set(report)
    assert "0 accuracy failure(s)" in proc.stdout


def test_gpu_check_without_cuda_exits_zero():
    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout, proc.stdout + proc.stderr
