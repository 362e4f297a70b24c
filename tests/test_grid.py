"""Ring attention on the sp groups of a DeepSpeed run with ZeRO and AutoTP tensor parallelism:
every grid reproduces the single-process losses (building blocks of the coming trainer)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _losses(tmp_path, nproc, sp, tp, zero):
    out = tmp_path / f"losses-{nproc}-{sp}-{tp}-{zero}.txt"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", "tests/scripts/grid_train.py",
           "--sp", str(sp), "--tp", str(tp), "--zero", str(zero), "--losses", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.tensor([float(x) for x in out.read_text().split()])


@pytest.mark.parametrize("nproc, sp, tp, zero", [(2, 2, 1, 3), (4, 2, 2, 1), (4, 2, 2, 2)])
def test_grid_matches_single_process(tmp_path, nproc, sp, tp, zero):
    reference = _losses(tmp_path, 1, 1, 1, 1)
    torch.testing.assert_close(_losses(tmp_path, nproc, sp, tp, zero), reference, rtol=1e-5, atol=0)
