"""The recipe trainer end to end: real DeepSpeed (CPU accelerator, gloo), tiny Llama, generated data.

Every grid reproduces the single-process losses of the same recipe; a killed run resumes to the
same loss sequence; the exported model loads without ringpatch; NaN stops the run and keeps the
last checkpoint; all three launchers start it."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.helpers import HANG_S
from tests.helpers.trainrun import ENV, ROOT, command, hold, launch, metrics, ok, recipe, run_pids, wait_for

pytestmark = pytest.mark.e2e

RTOL = 1e-5  # float32 on CPU; the ring's own error is ~1e-7 relative


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """The single-process run (plain python, no launcher) every grid must reproduce."""
    tmp = tmp_path_factory.mktemp("one")
    ok(launch(recipe(tmp, data), 1, launcher="python"))
    return tmp / "run"


def _assert_same_run(run_dir, reference_dir):
    losses, evals = metrics(run_dir)
    ref_losses, ref_evals = metrics(reference_dir)
    assert len(losses) == len(ref_losses) == 5 and len(evals) == len(ref_evals), (losses, evals)
    got = torch.tensor(losses + [e["eval_loss"] for e in evals], dtype=torch.float64)
    want = torch.tensor(ref_losses + [e["eval_loss"] for e in ref_evals], dtype=torch.float64)
    print(f"{run_dir.parent.name}: largest relative difference from one process over 5 losses and "
          f"{len(evals)} eval losses: {float(((got - want).abs() / want.abs()).max()):.1e}")  # fmt: skip
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=0)
    torch.testing.assert_close(
        torch.tensor([e["eval_loss"] for e in evals]),
        torch.tensor([e["eval_loss"] for e in ref_evals]),
        rtol=RTOL,
        atol=0,
    )


@pytest.mark.parametrize(
    "nproc, changes, launcher",
    [
        (2, {"parallel__sp": 2}, "torchrun"),  # sp = 2, ZeRO-2
        # ZeRO-3 under the deepspeed launcher, the MLP over 4 sequence tiles, the layer inputs offloaded
        # but the first layer's (not checkpointed), the norms chunked (exact: the reference is untiled,
        # stock, checkpoints every layer and keeps the inputs)
        (
            2,
            {
                "parallel__sp": 2,
                "zero__stage": 3,
                "mlp_tiles": 4,
                "activation_offload": True,
                "rmsnorm": "chunked",
                "uncheckpointed_layers": 1,
            },
            "deepspeed",
        ),  # fmt: skip
        # sp x tp, ZeRO-1, sp = Ulysses 2 (each tp rank's 1 K/V head repeated for its 2 Ulysses ranks)
        (
            4,
            {"parallel__sp": 2, "parallel__ulysses": 2, "parallel__tp": 2, "zero__stage": 1, "mlp_tiles": 3},
            "accelerate",
        ),
        # Ulysses 2 x ring 2, dp 1, attention outputs kept for the recompute (the reference recomputes them)
        (4, {"parallel__sp": 4, "parallel__ulysses": 2, "keep_attention": True}, "torchrun"),
        (
            2,
            {
                "parallel__sp": 2,
                "zero": {"stage": 3, "offload": "cpu"},  # CPU offload, through the shipped overlay
                "deepspeed": str(ROOT / "launch" / "deepspeed" / "zero3-offload.json"),
            },
            "torchrun",
        ),
        (
            2,
            {
                "parallel__sp": 2,
                "zero": {"stage": 3, "offload": "optimizer"},  # the optimizer alone in host memory
                "deepspeed": str(ROOT / "launch" / "deepspeed" / "zero3.json"),
            },
            "torchrun",
        ),
        # engine: fsdp2 (fully_shard per layer over every rank), alone and with the switches
        (2, {"engine": "fsdp2", "parallel__sp": 2, "zero__stage": 3}, "torchrun"),
        (
            2,
            {
                "engine": "fsdp2",
                "parallel__sp": 2,
                "zero": {"stage": 3, "offload": "cpu"},
                "mlp_tiles": 4,
                "activation_offload": True,
                "rmsnorm": "chunked",
                "uncheckpointed_layers": 1,
            },
            "torchrun",
        ),  # fmt: skip
        (
            4,
            {"engine": "fsdp2", "parallel__sp": 4, "parallel__ulysses": 2, "zero__stage": 3, "keep_attention": True},
            "accelerate",
        ),  # fmt: skip
    ],
    ids=[
        "sp2-zero2-torchrun",
        "sp2-zero3-tiles4-offload-chunked-norm-deepspeed",
        "sp2-ulysses2-tp2-zero1-tiles3-accelerate",
        "sp4-ulysses2-ring2-keep-attention-torchrun",
        "sp2-zero3-offload-overlay",
        "sp2-zero3-optimizer-offload",
        "sp2-fsdp2-torchrun",
        "sp2-fsdp2-offload-tiles4-chunked-norm",
        "sp4-fsdp2-ulysses2-ring2-keep-attention-accelerate",
    ],
)
def test_grid_reproduces_single_process(tmp_path, data, reference, nproc, changes, launcher):
    ok(launch(recipe(tmp_path, data, **changes), nproc, launcher=launcher))
    _assert_same_run(tmp_path / "run", reference)
    assert (tmp_path / "run" / "final" / "config.json").is_file() and (tmp_path / "run" / "stage0").is_dir()


def test_dp2_equals_one_process_with_the_same_samples(tmp_path, data):
    """dp = 2 with micro_batch 1 reads, per step, the two samples one process reads with
    micro_batch 2 (disjoint dp shards of one permutation); the mean loss and update agree.
    Also logs to wandb offline."""
    one = tmp_path / "one"
    one.mkdir()
    ok(launch(recipe(one, data, stages__1__micro_batch=2), 1, launcher="python"))
    dp = tmp_path / "dp"
    dp.mkdir()
    ok(launch(recipe(dp, data, micro_batch=1, zero__stage=1, wandb="offline"), 2))
    _assert_same_run(dp / "run", one / "run")
    assert list((dp / "run" / "wandb").glob("offline-run-*")), "wandb offline wrote no run"


LOSS_WITHOUT_RINGPATCH = """
import sys
sys.modules["ringpatch"] = None  # importing ringpatch now fails: the folder must not need it
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, ids_file = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder)
ids = torch.load(ids_file)
assert AutoTokenizer.from_pretrained(folder).eos_token_id is not None
with torch.no_grad():
    losses = [model(input_ids=row[None], labels=row[None]).loss.item() for row in ids]
print("loss", sum(losses) / len(losses), model.config.max_position_embeddings, model.config.rope_parameters["rope_theta"])
"""


@pytest.mark.parametrize(
    "changes",
    [{"zero__stage": 3}, {"parallel__tp": 2, "zero__stage": 2}, {"engine": "fsdp2", "zero__stage": 3}],
    ids=["zero3", "tp2-zero2", "fsdp2"],
)
def test_export_loads_without_ringpatch_and_scores_like_the_trained_model(tmp_path, data, reference, changes):
    """The run itself reproduces the one-process losses (sp 2 x tp 2 with ZeRO-2 is the grid's
    only run of that pair); its final folder then scores like the trained model without ringpatch."""
    ok(launch(recipe(tmp_path, data, parallel__sp=2, **changes), 2 * changes.get("parallel__tp", 1)))
    _assert_same_run(tmp_path / "run", reference)
    from ringpatch.data.packing import pack_documents
    from ringpatch.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    docs = [tok(line)["input_ids"] for line in _texts(data / "eval.jsonl")]
    ids = torch.tensor([p["input_ids"] for p in pack_documents(docs, 128, tok.eos_token_id)][:2])
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run(
        [sys.executable, "-c", LOSS_WITHOUT_RINGPATCH, str(tmp_path / "run" / "final"), str(tmp_path / "ids.pt")],
        capture_output=True,
        text=True,
        timeout=HANG_S,
        cwd=tmp_path,
    )
    ok(proc)
    _, loss, max_pos, theta = proc.stdout.split()
    trained = metrics(tmp_path / "run")[1][-1]["eval_loss"]  # the trained model's (ring) held-out loss
    assert abs(float(loss) - trained) <= 1e-5 * trained
    assert int(max_pos) == 128 and float(theta) == 21000.0  # the last stage's RoPE travels in config.json


def _texts(path):
    import json

    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("engine", [{}, {"engine": "fsdp2", "zero__stage": 3}], ids=["deepspeed", "fsdp2"])
def test_killed_run_resumes_to_the_same_losses(tmp_path, data, engine):
    """SIGKILL the whole launcher mid-run, leave a half-written checkpoint beside it, run the
    same command again: the loss sequence equals an uninterrupted run's. The run is held
    (SIGSTOP) the moment its first checkpoint is complete, so it is killed mid-run however fast
    or slow the machine is."""
    long = {"parallel__sp": 2, "stages__0__steps": 30, "save_every": 3, **engine}
    whole = tmp_path / "whole"
    whole.mkdir()
    ok(launch(recipe(whole, data, **long), 2))
    killed = tmp_path / "killed"
    killed.mkdir()
    path = recipe(killed, data, **long)
    proc = subprocess.Popen(
        command(path, 2),
        cwd=ROOT,
        env=ENV,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run = killed / "run"
    wait_for(lambda: (run / "checkpoints" / "latest").is_file(), "the first checkpoint")
    hold(path)
    for pid in run_pids(path):
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not run_pids(path), "the killed processes to go")
    latest = (run / "checkpoints" / "latest").read_text()
    assert not (run / "final").exists() and int(latest[4:]) < 30, latest
    partial = run / "checkpoints" / "step000000099"  # as a crash while writing would leave it
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    resumed = launch(path, 2)
    ok(resumed)
    assert f"resuming {run / 'checkpoints'} at step {int(latest[4:])}" in resumed.stdout + resumed.stderr
    torch.testing.assert_close(
        torch.tensor(metrics(run)[0]), torch.tensor(metrics(whole / "run")[0]), rtol=1e-6, atol=0
    )


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, data):
    path = recipe(tmp_path, data, parallel__sp=2, optim__lr=1e30, save_every=1)
    proc = launch(path, 2)
    assert proc.returncode != 0
    assert "the loss is nan at step 2 (stage 0, micro-step 0); stopped before the update" in proc.stderr
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step000000001" and not (ckpt / "step000000002").exists()
    assert not (tmp_path / "run" / "final").exists()


def test_checkpoint_of_another_recipe_is_refused(tmp_path, data):
    ok(launch(recipe(tmp_path, data, parallel__sp=2, stages=[{"seq_len": 64, "steps": 2}]), 2))
    other = recipe(tmp_path, data, parallel__sp=2, model__name="other", stages=[{"seq_len": 64, "steps": 4}])
    proc = launch(other, 2)
    assert proc.returncode != 0
    assert "what a resumed run cannot change (model.name: checkpoint 'tiny', recipe 'other')" in proc.stderr


def test_pretrained_folder_under_zero3_matches_one_process(tmp_path, data):
    """init: pretrained from a local folder (its own tokenizer), loaded partitioned under ZeRO-3
    (HfDeepSpeedConfig), gives the losses one process gets from the same folder."""
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    from ringpatch.data.tokenizer import byte_tokenizer

    config = yaml.safe_load(recipe(tmp_path, data).read_text())["model"]["config"]
    folder = tmp_path / "pretrained"
    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    model = {"name": str(folder), "dtype": "float32", "config": {"model_type": "llama", "num_attention_heads": 4}}
    one, ring = tmp_path / "one", tmp_path / "ring"
    for d in (one, ring):
        d.mkdir()
    ok(launch(recipe(one, data, model=model), 1, launcher="python"))
    ok(launch(recipe(ring, data, model=model, parallel__sp=2, zero__stage=3), 2))
    _assert_same_run(ring / "run", one / "run")


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "accelerate"])
def test_the_shipped_tiny_recipe_starts_under_every_launcher(tmp_path, launcher, demo_corpus):
    """recipes/tiny-cpu.yaml as shipped (its demo corpus generated if missing), stopped after 10 steps."""
    run = tmp_path / "run"
    ok(launch(ROOT / "recipes" / "tiny-cpu.yaml", 2, "--run-dir", str(run), "--max-steps", "10", launcher=launcher))
    losses, _ = metrics(run)  # the recipe logs every 10 steps
    assert len(losses) == 1 and losses[0] < 5.0  # ln(258) = 5.55 at the start
    assert (run / "checkpoints" / "latest").read_text() == "step000000010"
    assert (run / "report" / "summary.json").is_file()  # a partial run writes its report too


def test_a_rope_scaling_stage_reaches_the_exported_config(tmp_path, data):
    """A stage with rope_scaling (YaRN) trains, and the final config.json carries it for from_pretrained."""
    import json

    stages = [
        {"seq_len": 64, "steps": 2},
        {"seq_len": 128, "steps": 2, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}},
    ]
    ok(launch(recipe(tmp_path, data, parallel__sp=2, stages=stages), 2))
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["rope_parameters"] == {
        "rope_type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 10000.0,
    }
    assert config["max_position_embeddings"] == 128 and len(metrics(tmp_path / "run")[0]) == 4


def _short_documents(folder):
    """Documents of 5 to 30 bytes: every 64-token sequence packs several."""
    import json
    import random

    rng = random.Random(0)
    folder.mkdir()
    for name, count in (("train", 400), ("eval", 40)):
        docs = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(5, 30))) for _ in range(count)]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return folder


def _block_diagonal_loss(recipe_path, rows):
    """The first step's loss, recomputed in one process by the unpatched model with a 4D
    block-diagonal causal mask (documents from the resets of doc_position_ids)."""
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    config = yaml.safe_load(recipe_path.read_text())["model"]["config"]
    torch.manual_seed(0)  # the recipe's seed: the trainer's scratch weights
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), attn_implementation="eager")
    ids, positions = rows["input_ids"], rows["doc_position_ids"]
    seq = ids.shape[1]
    doc = (positions == 0).cumsum(-1)  # (B, S) document index
    i = torch.arange(seq)
    visible = (i[None, :, None] >= i[None, None, :]) & (doc[:, :, None] == doc[:, None, :])
    mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)[:, None]
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=positions, attention_mask=mask).logits
    targets = ids[:, 1:].clone()
    targets[doc[:, 1:] != doc[:, :-1]] = -100  # a document's last token predicts nothing
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100).item()


def test_document_masking_matches_a_block_diagonal_mask(tmp_path):
    """sp = 2 with document masking (the default, on the balanced layout): the first step's loss
    equals the unpatched model's under a 4D block-diagonal mask on the same packed rows, and
    differs from a run that attends across documents."""
    from ringpatch.data.prepare import load_prepared
    from ringpatch.data.sampler import ResumableSampler

    data = _short_documents(tmp_path / "short")
    stages = [{"seq_len": 64, "steps": 2}]
    masked, unmasked = tmp_path / "masked", tmp_path / "unmasked"
    for d in (masked, unmasked):
        d.mkdir()
    path = recipe(masked, data, parallel__sp=2, stages=stages)
    ok(launch(path, 2))
    ok(launch(recipe(unmasked, data, parallel__sp=2, stages=stages, data__document_masking=False), 2))
    prepared = load_prepared(next((data / "cache").glob("train-64-*")))
    first = list(itertools.islice(ResumableSampler(len(prepared), 1, 0, seed=0), 2))
    rows = prepared[first]
    assert int((rows["doc_position_ids"] == 0).sum()) >= 6, "the rows should pack several documents"
    want = _block_diagonal_loss(path, rows)
    got, across = metrics(masked / "run")[0][0], metrics(unmasked / "run")[0][0]
    assert abs(got - want) <= 1e-5 * want, (got, want)
    assert abs(across - want) > 1e-3 * want, (across, want)  # attending across documents is not the same


def test_every_switch_the_checkpoint_does_not_fix_may_change_on_resume(tmp_path, data):
    """Stopped at step 2 with every memory switch at its default, resumed with every switch that
    the checkpoint does not fix (plan/switches: fixed_on_resume False) turned on (stopped again at
    step 4 to trade uncheckpointed_layers for keep_attention, which refuse each other): the losses
    are the uninterrupted run's, so such a switch changes how a step is computed, not what a
    checkpoint holds; each change is printed."""
    from ringpatch.plan.switches import SWITCHES

    on = {"activation_offload": True, "uncheckpointed_layers": 1, "keep_attention": True, "mlp_tiles": 2,
          "rmsnorm": "chunked", "zero.offload": "optimizer"}  # fmt: skip
    free = {s.name for s in SWITCHES if not s.fixed_on_resume}
    assert free == set(on), "give each switch not fixed on resume a value to resume under"
    first = {k.replace(".", "__"): v for k, v in on.items() if k != "keep_attention"}
    second = {k.replace(".", "__"): v for k, v in on.items() if k != "uncheckpointed_layers"}
    base = {"parallel__sp": 2, "stages": [{"seq_len": 64, "steps": 6}], "save_every": 2}
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for d in (whole, resumed):
        d.mkdir()
    ok(launch(recipe(whole, data, **base), 2))
    ok(launch(recipe(resumed, data, **base), 2, "--max-steps", "2"))
    for changes, stop, changed in ((first, ["--max-steps", "4"], free - {"keep_attention"}),
                                   (second, [], {"keep_attention", "uncheckpointed_layers"})):  # fmt: skip
        proc = launch(recipe(resumed, data, **base, **changes), 2, *stop)
        ok(proc)
        for name in changed:
            assert f"{name} changed since the checkpoint" in proc.stdout, (name, proc.stdout[-2000:])
    got, want = metrics(resumed / "run")[0], metrics(whole / "run")[0]
    assert len(got) == len(want) == 6
    print(
        f"resumed under the switches: largest relative difference {max(abs(g - w) / w for g, w in zip(got, want, strict=True)):.1e}"
    )
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=RTOL, atol=0)


def test_a_changed_learning_rate_takes_effect_on_resume(tmp_path, data):
    """Stopped at step 2, resumed with another optim.lr: the new rate is used from step 3 on (the
    same lr as a run made with it from the start), and the change is printed and logged."""
    base = {"parallel__sp": 2, "stages": [{"seq_len": 64, "steps": 4}], "save_every": 2}
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    for d in (fresh, resumed):
        d.mkdir()
    ok(launch(recipe(fresh, data, optim__lr=0.001, **base), 2))
    ok(launch(recipe(resumed, data, optim__lr=0.003, **base), 2, "--max-steps", "2"))
    proc = launch(recipe(resumed, data, optim__lr=0.001, optim__betas=[0.9, 0.99], **base), 2)
    ok(proc)
    records = [json.loads(line) for line in (resumed / "run" / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in records if "lr" in r}
    want = {
        r["step"]: r["lr"]
        for r in map(json.loads, (fresh / "run" / "metrics.jsonl").read_text().splitlines())
        if "lr" in r
    }
    assert lr[3] == pytest.approx(want[3], rel=1e-12) and lr[4] == pytest.approx(want[4], rel=1e-12), (lr, want)
    assert lr[2] == pytest.approx(3 * want[2], rel=1e-12)  # the first run's rate, before the change
    assert [r for r in records if r.get("event") == "resume"][0]["changed"]["optim.lr"] == [0.003, 0.001]
    assert "optim.lr changed since the checkpoint: 0.003 -> 0.001 (the recipe's value is used)" in proc.stdout
    assert "optim.betas changed since the checkpoint: [0.9, 0.95] -> [0.9, 0.99]" in proc.stdout


def test_a_second_launch_on_a_running_run_dir_is_refused(tmp_path, data):
    """Two launches on one run_dir: the second stops before any process group, naming the first's
    pid, its message before any launcher traceback; the first finishes as if alone; a lock left
    by a killed run (its pid gone) is taken over by the next launch. The first run is held
    (SIGSTOP) from the moment it holds the lock until the second has been refused, so the outcome
    does not depend on which launch is faster. The second's other rank, waiting for its group,
    ends on the launcher's SIGTERM."""
    import socket

    path = recipe(tmp_path, data, parallel__sp=2, stages=[{"seq_len": 64, "steps": 20}])
    lock = tmp_path / "run" / "ringpatch.lock"
    first = subprocess.Popen(
        command(path, 2), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(lock.is_file, "the first run's lock")
    held = hold(path)
    try:
        holder = json.loads(lock.read_text())["pid"]
        second = launch(path, 2)
    finally:
        for pid in held:
            os.kill(pid, signal.SIGCONT)
    out, err = first.communicate(timeout=HANG_S)
    assert first.returncode == 0, out[-2000:] + err[-3000:]
    assert second.returncode != 0
    message = f"ringpatch train: {tmp_path / 'run'} is in use by another run (pid {holder} on "
    assert message in second.stderr, second.stderr[-3000:]
    assert "Traceback" not in second.stderr.split(message)[0]
    # the other rank, waiting for its group, ends on the launcher's SIGTERM, not its SIGKILL 30 s later
    assert "(SIGTERM)" in second.stderr and "SIGKILL" not in second.stderr, second.stderr[-1500:]
    assert len(metrics(tmp_path / "run")[0]) == 20 and not lock.exists()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 7, "started": "then"}))
    proc = launch(recipe(tmp_path, data, parallel__sp=2, stages=[{"seq_len": 64, "steps": 21}]), 2)
    ok(proc)
    assert "has ended; taking it over" in proc.stdout + proc.stderr


@pytest.mark.unit
def test_a_torn_last_line_of_the_log_is_named_and_cut_and_other_damage_refused(tmp_path, capsys):
    """A process killed while appending to metrics.jsonl leaves part of a line: resume names the file
    and cuts it; a bad line anywhere else is damage, refused naming the file and the line."""
    from types import SimpleNamespace

    from ringpatch.train.metrics import RunLog, read_records

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_records(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    RunLog(tmp_path, 0, SimpleNamespace(wandb="disabled"), resumed_step=2)
    assert f"cut the torn last line of {log}" in capsys.readouterr().out
    assert log.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    log.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=f"{log}, line 2, is not a JSON record"):
        read_records(tmp_path)


NO_DEEPSPEED = {
    "deepspeed/__init__.py": 'raise ImportError("deepspeed was imported")\n',
    # accelerate reads the venv's package metadata: make it see DeepSpeed as absent too
    "sitecustomize.py": "import accelerate.utils.imports as i\nimport accelerate.utils.other as o\n"
    "i.is_deepspeed_available = o.is_deepspeed_available = lambda: False\n",
}


def test_fsdp2_trains_and_resumes_where_deepspeed_is_not_installed(tmp_path, data, reference):
    """The lent GPU machine has no DeepSpeed: an engine: fsdp2 run with 4 MLP tiles (ringpatch's
    tiled MLP there) starts, reproduces the one-process losses, checkpoints, exports and resumes
    with every `import deepspeed` failing."""
    shadow = tmp_path / "no-deepspeed"
    for name, text in NO_DEEPSPEED.items():
        (shadow / name).parent.mkdir(parents=True, exist_ok=True)
        (shadow / name).write_text(text)
    env = dict(ENV, PYTHONPATH=str(shadow))
    path = recipe(tmp_path, data, engine="fsdp2", zero__stage=3, parallel__sp=2, mlp_tiles=4)
    for expected in ("exported", "resuming"):
        proc = subprocess.run(command(path, 2), cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_S)
        ok(proc)
        assert "deepspeed was imported" not in proc.stderr
        if expected == "exported":
            _assert_same_run(tmp_path / "run", reference)
        else:
            assert "resuming" in proc.stdout + proc.stderr
        path.write_text(path.read_text().replace("steps: 2", "steps: 3"))  # one more step to resume into
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_fsdp2_in_bf16_matches_deepspeed_zero3_in_bf16(tmp_path, data):
    """bf16 runs, sp 2: FSDP2 (float32 shards gathered as bf16, gradients reduced in float32) against
    DeepSpeed ZeRO-3 (bf16 weights, float32 master copies). Measured 9.4e-6 apart at most over the 5
    losses and 2 held-out losses; bf16 against float32 itself is ~3e-4 here."""
    runs = {}
    for name, changes in {"deepspeed": {}, "fsdp2": {"engine": "fsdp2"}}.items():
        (tmp_path / name).mkdir()
        ok(launch(recipe(tmp_path / name, data, parallel__sp=2, zero__stage=3, model__dtype="bfloat16", **changes), 2))
        losses, evals = metrics(tmp_path / name / "run")
        runs[name] = torch.tensor(losses + [e["eval_loss"] for e in evals], dtype=torch.float64)
    assert len(runs["fsdp2"]) == 7
    torch.testing.assert_close(runs["fsdp2"], runs["deepspeed"], rtol=1e-4, atol=0)
