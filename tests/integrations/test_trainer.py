"""RingTrainer against the stock transformers.Trainer on one process (or dp processes) with the
same data: losses per step to 1e-5, gradient norms (after the averaging DDP/DeepSpeed do) to 1e-4,
eval loss to 1e-5, and the total batch size counting dp ranks only. Gradient accumulation 2
throughout: the setting in which a stock Trainer on sharded batches doubled the loss."""

from __future__ import annotations

import functools
import json
import subprocess

import pytest

from tests.helpers import ROOT
from tests.helpers.trainrun import BIN, ENV

pytestmark = pytest.mark.e2e

SCRIPT = str(ROOT / "tests" / "integrations" / "trainer_run.py")
ZERO = '{{"zero_optimization": {{"stage": {stage}}}, "train_micro_batch_size_per_gpu": "auto", ' \
       '"gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "optimizer": {{"type": "AdamW", ' \
       '"params": {{"lr": "auto", "weight_decay": "auto", "betas": "auto", "eps": "auto"}}}}}}'  # fmt: skip


def _run(tmp, nproc: int, *args: str) -> list[dict]:
    out = tmp / f"{nproc}-{'-'.join(a.replace('/', '_') for a in args)}.json"
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", SCRIPT, "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(ENV, DS_ACCELERATOR="cpu"), capture_output=True, text=True,
                          timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plain")
    return functools.cache(lambda nproc, *args: _run(tmp, nproc, "--plain", "--ga", "2", *args))


def _pick(history, key):
    return [h[key] for h in history if key in h and "step" in h][: 4 if key == "eval_loss" else 3]


@pytest.mark.parametrize(
    "nproc, ring_args, ref_nproc, ref_args, rel",
    [
        (2, ("--sp", "2"), 1, (), 1e-5),
        (4, ("--sp", "2"), 2, (), 1e-5),  # dp 2 x sp 2 against DDP over 2 processes
        (2, ("--sp", "2", "--deepspeed", "zero2"), 1, (), 1e-5),
        (2, ("--sp", "2", "--deepspeed", "zero3"), 1, (), 1e-5),
        (2, ("--sp", "2", "--bf16"), 1, ("--bf16",), 2e-2),  # autocast bf16 on both sides
    ],
    ids=["sp2", "dp2-sp2", "sp2-zero2", "sp2-zero3", "sp2-bf16"],
)
def test_ring_trainer_matches_the_stock_trainer(tmp_path, reference, nproc, ring_args, ref_nproc, ref_args, rel):
    args = list(ring_args)
    if "--deepspeed" in args:
        i = args.index("--deepspeed") + 1
        config = tmp_path / f"{args[i]}.json"
        config.write_text(ZERO.format(stage=args[i][-1]))
        args[i] = str(config)
    ring, ref = _run(tmp_path, nproc, "--ga", "2", *args), reference(ref_nproc, *ref_args)
    for key, tol in (("loss", rel), ("grad_norm", 10 * rel), ("eval_loss", rel)):
        got, want = _pick(ring, key), _pick(ref, key)
        assert len(got) == len(want) > 0, (key, got, want)
        assert got == pytest.approx(want, rel=tol), (key, got, want)
    assert ring[-1]["total_batch"] == ref[-1]["total_batch"] == 2 * 2 * (nproc // 2)
