"""Ring attention on the sp groups of a DeepSpeed run with ZeRO and AutoTP tensor parallelism:
every grid reproduces the single-process losses (building blocks of the coming trainer)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT

pytestmark = pytest.mark.e2e


def _run(tmp_path, nproc, sp, tp, zero, *extra):
    out = tmp_path / f"losses-{nproc}-{sp}-{tp}-{zero}.txt"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [
        torchrun,
        "--standalone",
        f"--nproc_per_node={nproc}",
        "tests/train/grid_train.py",
        "--sp",
        str(sp),
        "--tp",
        str(tp),
        "--zero",
        str(zero),
        "--losses",
        str(out),
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc, out


def _losses(tmp_path, nproc, sp, tp, zero, *extra):
    proc, out = _run(tmp_path, nproc, sp, tp, zero, *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.tensor([float(x) for x in out.read_text().split()])


@pytest.mark.parametrize("nproc, sp, tp, zero", [(2, 2, 1, 3), (4, 2, 2, 1), (4, 2, 2, 2)])
def test_grid_matches_single_process(tmp_path, nproc, sp, tp, zero):
    reference = _losses(tmp_path, 1, 1, 1, 1)
    torch.testing.assert_close(_losses(tmp_path, nproc, sp, tp, zero), reference, rtol=1e-5, atol=0)


def test_kill_and_resume_continues_exactly(tmp_path):
    """Stopped after 2 of 4 steps (and a half-written checkpoint left behind), then run again
    with the same command: the same 4 losses."""
    run_dir = str(tmp_path / "run")
    whole = _losses(tmp_path, 2, 2, 1, 2, "--steps", "4")
    first = _losses(tmp_path, 2, 2, 1, 2, "--steps", "4", "--run-dir", run_dir, "--stop-after", "2")
    assert len(first) == 2
    # a crash while writing step 3: a half-written tag folder, `latest` still names step 2
    partial = tmp_path / "run" / "step000000003"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    assert (tmp_path / "run" / "latest").read_text() == "step000000002"
    resumed = _losses(tmp_path, 2, 2, 1, 2, "--steps", "4", "--run-dir", run_dir)
    torch.testing.assert_close(resumed, whole, rtol=1e-6, atol=0)
    # another recipe's checkpoint is refused, naming the difference
    proc, _ = _run(tmp_path, 2, 2, 1, 2, "--steps", "4", "--run-dir", run_dir, "--model-name", "other")
    assert proc.returncode != 0
    assert (
        "the recipe differs from its checkpoint's in what a resumed run cannot change "
        "(model.name: checkpoint 'tiny', recipe 'other')" in proc.stderr
    )


LOAD_WITHOUT_RINGPATCH = """
import sys
sys.modules["ringpatch"] = None  # importing ringpatch now fails: the folder must not need it
import torch
from transformers import AutoModelForCausalLM
folder, logits_file = sys.argv[1], sys.argv[2]
saved = torch.load(logits_file)
model = AutoModelForCausalLM.from_pretrained(folder)
with torch.no_grad():
    logits = model(input_ids=saved["input_ids"]).logits
torch.testing.assert_close(logits, saved["logits"], rtol=1e-5, atol=1e-5)
print("loaded", model.config._attn_implementation, model.config.max_position_embeddings)
"""


@pytest.mark.parametrize("zero", [2, 3])
def test_export_loads_without_ringpatch(tmp_path, zero):
    folder = tmp_path / "final"
    _losses(tmp_path, 2, 2, 1, zero, "--steps", "2", "--export", str(folder))
    assert (folder / "config.json").is_file() and not (tmp_path / "final.tmp").exists()
    cmd = [sys.executable, "-c", LOAD_WITHOUT_RINGPATCH, str(folder), str(folder.with_suffix(".logits.pt"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "loaded" in proc.stdout
