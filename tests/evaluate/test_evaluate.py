"""Evaluation: ring prefill scores equal single-process ones on 2 and 4 ranks; perplexity-vs-length
and passkey produce their tables, CSV, JSON and PNG; bad lengths are refused up front."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ringpatch.data.tokenizer import byte_tokenizer
from ringpatch.evaluate import (
    CLASSIC,
    check_lengths,
    demo_template,
    passkey_prompt,
    perplexity_by_length,
    ring_prefill_scores,
)
from tests.helpers import HANG_S, ROOT
from tests.helpers.models import CONFIGS, build
from tests.helpers.procs import spawn

pytestmark = pytest.mark.unit


def _reference_scores(model, ids, scored):
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, scored].float()  # (B, K, V)
    targets = ids[:, scored + 1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return nll, (logits.argmax(-1) == targets).float()


def _prefill_worker(rank, world, name, layout, ulysses=1):
    import ringpatch

    group = ringpatch.ulysses_ring_group(ulysses) if ulysses > 1 else None
    reference = build(name).eval()
    model = ringpatch.patch_model(build(name).eval(), group=group, layout=layout)
    seq = 96 if layout == "contiguous" else 128
    ids = torch.randint(0, reference.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(5))
    scored = torch.tensor([0, 5, 31, 32, 63, 64, seq - 2])  # spread over every rank's chunks
    nll, correct = ring_prefill_scores(model, ids, scored, group=group, layout=layout)
    ref_nll, ref_correct = _reference_scores(reference, ids, scored)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(correct, ref_correct, rtol=0, atol=0)
    lengths = [32, 64, seq] if layout == "contiguous" else [64, seq]
    losses = perplexity_by_length(model, ids, lengths, 16, group=group, layout=layout)
    for n in lengths:
        ref, _ = _reference_scores(reference, ids[:, -n:], torch.arange(n - 17, n - 1))
        assert abs(losses[n] - ref.mean().item()) <= 1e-5 * ref.mean().item()


def _documents_worker(rank, world, layout):
    """Packed documents (different per row): ring prefill with position_ids that restart equals the
    unpatched model under a 4D block-diagonal mask."""
    import ringpatch

    reference = build("llama").eval()
    model = ringpatch.patch_model(build("llama").eval(), layout=layout)
    seq = 128
    ids = torch.randint(0, reference.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(6))
    splits = [[30, 2, 60, 36], [1, 127]]
    positions = torch.tensor([[p for n in row for p in range(n)] for row in splits])
    doc = (positions == 0).cumsum(-1)
    i = torch.arange(seq)
    visible = (i[None, :, None] >= i[None, None, :]) & (doc[:, :, None] == doc[:, None, :])
    mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)[:, None]
    scored = torch.tensor([0, 5, 31, 32, 63, 64, seq - 2])
    with torch.no_grad():
        logits = reference(input_ids=ids, position_ids=positions, attention_mask=mask).logits[:, scored].float()
    targets = ids[:, scored + 1]
    ref_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    nll, correct = ring_prefill_scores(model, ids, scored, layout=layout, position_ids=positions)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(correct, (logits.argmax(-1) == targets).float(), rtol=0, atol=0)


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", ["zigzag", "balanced"])
def test_ring_prefill_keeps_documents_apart(layout):
    spawn(_documents_worker, 2, layout)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "world, name, layout, ulysses",
    [
        (2, "llama", "zigzag", 1),
        (2, "mistral-w20", "zigzag", 1),
        (2, "llama", "contiguous", 1),
        (4, "llama", "zigzag", 1),
        (4, "mistral-w20", "zigzag", 2),  # Ulysses 2 x ring 2
        (4, "llama", "contiguous", 1),
    ],
)
def test_ring_prefill_equals_single_process(world, name, layout, ulysses):
    assert name in CONFIGS
    spawn(_prefill_worker, world, name, layout, ulysses)


@pytest.mark.parametrize("template", [CLASSIC, demo_template()], ids=["classic", "demo"])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_has_the_length_and_the_key_where_asked(template, depth):
    tok = byte_tokenizer()
    ids, k = passkey_prompt(tok, template, 1024, depth, random.Random(3))
    text = tok.decode(ids)
    assert len(ids) == 1024 and k == template.key_length  # bytes: one token per key character
    key = text[-k:]
    assert set(key) <= set(template.key_alphabet) and text.startswith(template.intro)
    assert text.endswith(template.question + key)
    needle = template.needle.format(key=key)
    where = text.index(needle) - len(template.intro)
    room = 1024 - len(template.intro) - len(needle) - len(template.question) - k
    assert abs(where - depth * room) <= 1


def test_lengths_the_ring_cannot_take_are_refused():
    with pytest.raises(
        ValueError, match=r"length 1004 is not divisible by the zigzag layout's 8 chunks over 4 ranks; use 1000 or 1008"
    ):
        check_lengths([1024, 1004], "zigzag", 4, 10**6)
    with pytest.raises(
        ValueError,
        match=r"length 65536 puts 32768 tokens on each of 2 ranks, over eval.max_tokens_per_rank 16384; launch more ranks \(at least 4\)",
    ):
        check_lengths([65536], "zigzag", 2, 16384)


def test_models_with_the_same_folder_name_keep_their_own_results(tmp_path):
    """Two runs' `final` side by side: one label each (the name alone would give both one key, and
    the second model's results would replace the first's without a word)."""
    from ringpatch.evaluate.command import model_labels

    a, b = str(tmp_path / "run-a" / "final"), str(tmp_path / "run-b" / "final")
    assert model_labels([a, b]) == {"run-a/final": a, "run-b/final": b}
    assert model_labels([str(tmp_path / "base"), b]) == {"base": str(tmp_path / "base"), "final": b}
    relative = model_labels(["final", b])  # a relative path is told apart by the folders it resolves in
    assert list(relative.values()) == ["final", b] and list(relative)[1] == "run-b/final", relative
    with pytest.raises(ValueError, match=r"--model names the same folder more than once"):
        model_labels([a, str(tmp_path / "run-a" / ".." / "run-a" / "final")])


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """A tiny 'base' and 'extended' model folder with the byte tokenizer, and held-out text."""
    from ringpatch.data.corpus import write_corpus

    tmp = tmp_path_factory.mktemp("models")
    tok = byte_tokenizer()
    for i, name in enumerate(["base", "extended"]):
        model = build("llama", seed=i)
        model.config.vocab_size = 258
        model.resize_token_embeddings(258)
        model.save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)
    write_corpus(tmp / "data", train_docs=2, eval_docs=4, chars=(300, 1200), eval_chars=1200)
    return tmp


@pytest.mark.e2e
def test_eval_command_writes_tables_csv_json_png(two_models, tmp_path):
    out = tmp_path / "eval"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "ringpatch.evaluate",
        "--model",
        str(two_models / "base"),
        str(two_models / "extended"),
        "--data",
        str(two_models / "data" / "eval.jsonl"),
        "--ppl-lengths",
        "96",
        "128",
        "256",
        "--passkey-lengths",
        "256",
        "512",
        "--depths",
        "0.25",
        "0.75",
        "--trials",
        "2",
        "--passkey-template",
        "demo",
        "--samples",
        "2",
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "loss of the last 64 tokens" in proc.stdout and "passkey accuracy, extended" in proc.stdout
    ppl = json.loads((out / "perplexity.json").read_text())
    assert sorted((r["model"], r["length"]) for r in ppl) == sorted(
        (m, n) for m in ("base", "extended") for n in (96, 128, 256)
    )
    assert all(abs(r["perplexity"] - 2.718281828 ** r["loss"]) < 1e-6 * r["perplexity"] for r in ppl)
    keys = json.loads((out / "passkey.json").read_text())
    assert len(keys) == 2 * 2 * 2 and all(r["accuracy"] in (0.0, 0.5, 1.0) for r in keys)
    assert all(r["samples"] == 2 and r["tokens"] == 2 * 64 for r in ppl)  # what each length scored
    assert (out / "perplexity.csv").read_text().splitlines()[0] == "model,length,loss,perplexity,samples,tokens"
    assert "the first prefill" in proc.stderr and ("TFLOP" in proc.stderr or "GFLOP" in proc.stderr)
    for png in ("perplexity.png", "passkey.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_eval_command_refuses_bad_lengths_before_starting(two_models):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ringpatch.evaluate",
            "--model",
            str(two_models / "base"),
            "--data",
            str(two_models / "data" / "eval.jsonl"),
            "--ppl-lengths",
            "100",
            "--passkey-lengths",
            "256",
        ],
        capture_output=True,
        text=True,
        timeout=HANG_S,
        env=dict(os.environ, WORLD_SIZE="4"),
    )
    assert proc.returncode == 2
    assert "evaluation length 100 is not divisible by the zigzag layout's 8 chunks over 4 ranks" in proc.stderr


def _asked(argv):
    from ringpatch.evaluate.command import _spec_and_models, build_parser
    from ringpatch.evaluate.spec import EVAL_TASKS

    spec, data_spec, _, _, _ = _spec_and_models(build_parser().parse_args(argv))
    return spec, [task.name for task in EVAL_TASKS if task.enabled(spec, data_spec)]


def test_flags_alone_run_only_the_tasks_they_name(tmp_path):
    """Without a recipe a task runs only when its lengths are given (passkey no longer follows the
    perplexity lengths); with a recipe its eval section fills what the flags leave out; nothing
    asked for is an error, not an empty run."""
    from ringpatch.data.corpus import write_corpus

    folder = tmp_path / "m"
    build("llama").save_pretrained(folder)
    data = write_corpus(tmp_path / "data", train_docs=1, eval_docs=2) / "eval.jsonl"
    model = ["--model", str(folder)]
    spec, tasks = _asked([*model, "--data", str(data), "--ppl-lengths", "128", "256"])
    assert tasks == ["perplexity"] and spec.passkey_lengths == ()
    assert _asked([*model, "--passkey-lengths", "256"])[1] == ["passkey"]
    assert _asked([*model, "--passkey-lengths", "256", "--ruler-tasks", "vt"])[0].ruler_lengths == (256,)
    spec, tasks = _asked(["--recipe", str(ROOT / "recipes" / "tiny-cpu.yaml"), *model, "--ppl-lengths", "128", "256"])
    assert tasks == ["perplexity", "passkey", "ruler"] and spec.passkey_lengths == (128, 512, 1024)
    with pytest.raises(ValueError, match="nothing to evaluate: give --ppl-lengths with --data"):
        _asked(model)
    with pytest.raises(ValueError, match="--ruler-tasks needs --ruler-lengths"):
        _asked([*model, "--ruler-tasks", "vt"])


def test_help_describes_the_length_and_sample_flags():
    from ringpatch.evaluate.command import build_parser

    text = " ".join(build_parser().format_help().split())
    for flag, words in (
        ("--ppl-lengths", "context lengths for perplexity vs length"),
        ("--passkey-lengths", "prompt lengths for passkey retrieval"),
        ("--ruler-lengths", "prompt lengths for the RULER tasks"),
        (
            "--samples",
            "held-out sequences scored for perplexity (default: the recipe's data.eval_samples; with --data, 4)",
        ),
    ):
        assert f"{flag} N [N ...] {words}" in text or f"{flag} SAMPLES {words}" in text, flag


def test_progress_counts_every_prefill_and_estimates_from_the_first(capsys):
    """The bar moves by each prefill's forward FLOPs, whichever task makes it; the first prefill's
    time is turned into an estimate for the planned ones; a prefill beyond the plan grows the total."""
    from ringpatch.evaluate.progress import Progress, describe_prefills
    from ringpatch.hf.counts import forward_flops

    model = build("llama").eval()
    planned = [(64, 2), (128, 1)]
    ids = torch.randint(0, 101, (2, 128))
    with Progress(model, planned, sp_size=1, label="tiny", enabled=True) as progress:
        progress.task = "perplexity"
        with torch.no_grad():
            model(input_ids=ids[:, :64])
            model(input_ids=ids[:1])
            model(input_ids=ids[:1, :32])  # one more than planned
        bar = progress.bar
        work = [2 * forward_flops(model.config.to_dict(), 64, 0), forward_flops(model.config.to_dict(), 128, 0),
                forward_flops(model.config.to_dict(), 32, 0)]  # fmt: skip
        assert progress.count == 3 and bar.n == pytest.approx(sum(work) / progress.scale)
        assert bar.total == pytest.approx(sum(work) / progress.scale)
    err = capsys.readouterr().err
    assert "ringpatch eval: tiny: the first prefill (2 x 64 tokens) took" in err
    assert "its 2 planned prefills will take about" in err
    assert (
        describe_prefills({"passkey": [(64, 1), (64, 1), (128, 1)]}) == "  passkey: 3 prefills (2 x 64, 1 x 128 tokens)"
    )
    with Progress(model, planned, sp_size=1, label="quiet", enabled=False), torch.no_grad():
        model(input_ids=ids)  # other ranks count nothing
    assert not model._forward_hooks and not model._forward_pre_hooks
