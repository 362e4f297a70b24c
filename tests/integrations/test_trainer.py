"""RingTrainer against the stock transformers.Trainer on one process (or dp processes) with the
same data: losses per step to 1e-5, gradient norms (after the averaging DDP/DeepSpeed do) to 1e-4,
eval loss to 1e-5, and the total batch size counting dp ranks only. Gradient accumulation 2
throughout: the setting in which a stock Trainer on sharded batches doubled the loss."""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers.trainrun import BIN, ENV

pytestmark = pytest.mark.e2e

SCRIPT = str(ROOT / "tests" / "integrations" / "trainer_run.py")
SFT_SCRIPT = str(ROOT / "tests" / "integrations" / "sft_run.py")
ZERO = '{{"zero_optimization": {{"stage": {stage}}}, "train_micro_batch_size_per_gpu": "auto", ' \
       '"gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "optimizer": {{"type": "AdamW", ' \
       '"params": {{"lr": "auto", "weight_decay": "auto", "betas": "auto", "eps": "auto"}}}}}}'  # fmt: skip


def _run(tmp, nproc: int, *args: str, script: str = SCRIPT):
    out = tmp / f"{nproc}-{'-'.join(a.replace('/', '_').replace(',', '_') for a in args)}-{Path(script).stem}.json"
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", script, "--out", str(out), *args]
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


def test_ring_sft_trainer_matches_trl_on_one_process(tmp_path):
    """TRL's SFTTrainer (its own loss from the fused LM head, its metrics) on sp = 2 against one
    process: without packing, with `wrapped` packing, and with `bfd` packing, whose padding-free
    rows of several documents reach the ring as document masking (one launch runs all three)."""
    modes = "none,wrapped,bfd"
    ring = _run(tmp_path, 2, "--sp", "2", "--packing", modes, script=SFT_SCRIPT)
    ref = _run(tmp_path, 1, "--plain", "--packing", modes, script=SFT_SCRIPT)
    for mode in modes.split(","):
        for key, tol in (("loss", 1e-5), ("grad_norm", 1e-4), ("eval_loss", 1e-5), ("entropy", 1e-5),
                         ("mean_token_accuracy", 1e-6), ("num_tokens", 0)):  # fmt: skip
            got, want = _pick(ring[mode], key), _pick(ref[mode], key)
            assert len(got) == len(want) > 0, (mode, key, got, want)
            assert got == pytest.approx(want, rel=tol), (mode, key, got, want)


@pytest.mark.unit
def test_a_packed_eval_set_is_refused_with_the_fix(tmp_path, monkeypatch):
    """TRL packs the eval set like the train set by default; RingSFTTrainer's eval loss on packed
    eval rows differed from one process, so it refuses them, naming eval_packing=False."""
    import torch.distributed as dist
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, LlamaConfig
    from trl import SFTConfig

    from ringpatch.data.tokenizer import byte_tokenizer
    from ringpatch.integrations.trainer import RingSFTTrainerMixin, RingTrainerMixin

    def init(self, *args, sp, layout="balanced", **kwargs):  # the grid of 2 ranks, without processes
        super(RingTrainerMixin, self).__init__(*args, **kwargs)
        self.ring_dims = type("Dims", (), {"sp": sp, "dp": 1})()

    monkeypatch.setattr(RingTrainerMixin, "__init__", init)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    from ringpatch.integrations.trainer import RingSFTTrainer

    config = LlamaConfig(vocab_size=258, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    ds = Dataset.from_dict({"text": ["abc def ghi"] * 4})
    args = SFTConfig(output_dir=str(tmp_path), packing=True, use_cpu=True, report_to=[], bf16=False, max_length=16)
    with pytest.raises(NotImplementedError, match=r"set SFTConfig\(eval_packing=False\)"):
        RingSFTTrainer(model=AutoModelForCausalLM.from_config(config), args=args, train_dataset=ds, eval_dataset=ds,
                       processing_class=byte_tokenizer(), sp=2)  # fmt: skip
    assert issubclass(RingSFTTrainer, RingSFTTrainerMixin)
