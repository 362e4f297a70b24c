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

from tests.helpers import HANG_S, ROOT
from tests.helpers.trainrun import BIN, ENV, free_port

pytestmark = pytest.mark.e2e

SCRIPT = str(ROOT / "tests" / "integrations" / "trainer_run.py")
SFT_SCRIPT = str(ROOT / "tests" / "integrations" / "sft_run.py")
ZERO = '{{"zero_optimization": {{"stage": {stage}}}, "train_micro_batch_size_per_gpu": "auto", ' \
       '"gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "optimizer": {{"type": "AdamW", ' \
       '"params": {{"lr": "auto", "weight_decay": "auto", "betas": "auto", "eps": "auto"}}}}}}'  # fmt: skip


def _run(tmp, nproc: int, *args: str, script: str = SCRIPT, launcher: str = "torchrun", stderr: list | None = None,
         accelerate_config: Path = ROOT / "launch/accelerate/cpu-2proc.yaml"):  # fmt: skip
    out = tmp / f"{nproc}-{'-'.join(a.replace('/', '_').replace(',', '_') for a in args)}-{Path(script).stem}.json"
    if launcher == "accelerate":
        start = [str(BIN / "accelerate"), "launch", "--config_file", str(accelerate_config),
                 "--num_processes", str(nproc), "--main_process_port", str(free_port())]  # fmt: skip
    else:
        start = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*start, script, "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(ENV, DS_ACCELERATOR="cpu"), capture_output=True, text=True,
                          timeout=HANG_S)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    if stderr is not None:
        stderr.append(proc.stderr)
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
        (2, ("--sp", "2", "accelerate"), 1, (), 1e-5),  # under `accelerate launch`
        (4, ("--sp", "2"), 2, (), 1e-5),  # dp 2 x sp 2 against DDP over 2 processes
        (2, ("--sp", "2", "--deepspeed", "zero2"), 1, (), 1e-5),
        (2, ("--sp", "2", "--deepspeed", "zero3"), 1, (), 1e-5),
        (2, ("--sp", "2", "--bf16"), 1, ("--bf16",), 2e-2),  # autocast bf16 on both sides
        (4, ("--sp", "4", "--ulysses", "2"), 1, (), 1e-5),  # Ulysses 2 x ring 2
    ],
    ids=["sp2-accelerate", "dp2-sp2", "sp2-zero2", "sp2-zero3", "sp2-bf16", "sp4-ulysses2"],
)
def test_ring_trainer_matches_the_stock_trainer(tmp_path, reference, nproc, ring_args, ref_nproc, ref_args, rel):
    args, launcher = list(ring_args), "torchrun"
    if args[-1] == "accelerate":
        args, launcher = args[:-1], "accelerate"
    if "--deepspeed" in args:
        i = args.index("--deepspeed") + 1
        config = tmp_path / f"{args[i]}.json"
        config.write_text(ZERO.format(stage=args[i][-1]))
        args[i] = str(config)
    ring, ref = _run(tmp_path, nproc, "--ga", "2", *args, launcher=launcher), reference(ref_nproc, *ref_args)
    for key, tol in (("loss", rel), ("grad_norm", 10 * rel), ("eval_loss", rel), ("num_input_tokens_seen", 0)):
        got, want = _pick(ring, key), _pick(ref, key)
        assert len(got) == len(want) > 0, (key, got, want)
        assert got == pytest.approx(want, rel=tol), (key, got, want)
    sp = int(args[args.index("--sp") + 1])
    assert ring[-1]["total_batch"] == ref[-1]["total_batch"] == 2 * 2 * (nproc // sp)


def test_ring_sft_trainer_matches_trl_on_one_process(tmp_path):
    """TRL's SFTTrainer (its own loss from the fused LM head, its metrics) on sp = 2 against one
    process: without packing, with `wrapped` packing, and with `bfd` packing, whose padding-free
    rows of several documents reach the ring as document masking (one launch runs all three).
    The eval set (7 samples, batches of 2) is packed like the train set and ends in a partial
    batch, which a ring must not pad with repeated samples."""
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
def test_metrics_from_logits_are_refused_on_sp_above_one(tmp_path, monkeypatch):
    """compute_metrics would see each rank's part of the logits: refused with the way out."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, LlamaConfig, TrainingArguments

    from ringpatch.integrations.trainer import RingTrainer

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))  # the same faked world of 2
    config = LlamaConfig(vocab_size=258, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(NotImplementedError, match="compute_metrics / preprocess_logits_for_metrics with sp > 1"):
        RingTrainer(model=AutoModelForCausalLM.from_config(config), args=args, compute_metrics=lambda p: {}, sp=2)


def test_a_trainer_that_runs_as_one_process_under_a_launcher_is_told_so(tmp_path):
    """torchrun starts 2 CPU processes, TrainingArguments lacks use_cpu, so transformers runs each as
    a lone process: RingTrainer says exactly that and the fix (it used to blame the dataset)."""
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", SCRIPT, "--out", str(tmp_path / "x.json"),
           "--sp", "2", "--no-use-cpu"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode != 0
    assert (
        "the launcher started 2 processes, but the Trainer runs as 1 (TrainingArguments.parallel_mode not_parallel): "
        "on a machine without a GPU it needs TrainingArguments(use_cpu=True)" in proc.stderr
    ), proc.stderr[-3000:]


FSDP2_CPU = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config: {fsdp_version: 2, fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP, fsdp_reshard_after_forward: true}
num_machines: 1
machine_rank: 0
mixed_precision: 'no'
use_cpu: true
rdzv_backend: static
same_network: true
"""


def test_fsdp_that_accelerate_drops_on_cpu_is_said_to_be_dropped(tmp_path, reference):
    """accelerate runs an FSDP2 config on CPU as DDP without a word: RingTrainer says so in one line,
    and the run is the one-process run's (as DDP's is)."""
    config = tmp_path / "fsdp2-cpu.yaml"
    config.write_text(FSDP2_CPU)
    said: list[str] = []
    got = _run(tmp_path, 2, "--sp", "2", "--ga", "2", launcher="accelerate", accelerate_config=config, stderr=said)
    line = (
        "ringpatch: RingTrainer: FSDP was asked for (accelerate's FSDP config, version 2) but accelerate runs this as "
        "MULTI_CPU without it (it applies FSDP only on accelerators), so every process holds the whole model"
    )
    assert said[0].count(line) == 1, said[0][-3000:]  # once, from process 0
    want = reference(1)
    for key, tol in (("loss", 1e-5), ("grad_norm", 1e-4), ("eval_loss", 1e-5)):
        assert len(_pick(got, key)) == len(_pick(want, key)) > 0, key
        assert _pick(got, key) == pytest.approx(_pick(want, key), rel=tol), key


@pytest.mark.parametrize("key", ["cp_size", "sp_size"])
def test_accelerates_own_sequence_split_beside_the_ring_is_refused(key, tmp_path, monkeypatch):
    """`accelerate launch --use_parallelism_config --parallelism_config_cp_size 2` (its environment):
    refused before the Trainer builds anything, naming both and the way out."""
    from transformers import AutoModelForCausalLM, LlamaConfig, TrainingArguments

    from ringpatch.errors import Unsupported
    from ringpatch.integrations.trainer import RingTrainer

    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    monkeypatch.setenv(f"PARALLELISM_CONFIG_{key.upper()}", "2")
    config = LlamaConfig(vocab_size=258, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(Unsupported, match=rf"ParallelismConfig {key} 2\) and RingTrainer's ring \(sp 2\) would both "
                       rf"split each sequence: use one. Drop {key}"):  # fmt: skip
        RingTrainer(model=AutoModelForCausalLM.from_config(config), args=args, sp=2)
