"""RULER-style tasks: exact lengths, needles at their depths, scorers that accept an oracle and
reject a wrong answer, ring prefill equal to one unpatched process, the effective-length rule,
and bad settings refused before any model loads."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from ringpatch.data.tokenizer import byte_tokenizer
from ringpatch.evaluate.command import main as eval_main
from ringpatch.evaluate.prefill import ring_prefill_scores
from ringpatch.evaluate.ruler import (
    TASKS,
    Builder,
    check_tokenizer,
    effective_length,
    min_length,
    ruler_scores,
    score,
    scored_positions,
    task_means,
)
from tests.helpers.procs import spawn

pytestmark = pytest.mark.unit


class Oracle(torch.nn.Module):
    """A 'model' whose logits put all mass on the true next token of `ids` (or, wrong=True, on
    the token after it), at the kept positions; one process, no ring."""

    def __init__(self, ids: torch.Tensor, vocab: int, wrong: bool = False):
        super().__init__()
        self.ids, self.vocab, self.wrong = ids, vocab, wrong

    def forward(self, input_ids, position_ids, logits_to_keep, **_):
        nxt = self.ids[position_ids[0, logits_to_keep] + 1]
        target = (nxt + 1) % self.vocab if self.wrong else nxt
        return SimpleNamespace(logits=torch.nn.functional.one_hot(target, self.vocab).float()[None] * 50)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [600, 4096])
def test_prompts_have_the_length_the_depth_and_an_answer_only_the_truth_passes(task, length):
    tok = byte_tokenizer()
    builder = Builder(tok)
    for depth in (0.0, 0.25, 0.5, 1.0) if task != "cwe" else (None,):
        prompt = builder.build(task, length, depth, random.Random(f"{task}-{depth}"))
        assert prompt.ids.shape == (length,)
        assert prompt.items[-1][1] == length  # the answer ends the prompt
        if task != "cwe":
            (start, size), others = prompt.needles[0], prompt.needles[1:]
            hay_before = start - prompt.region[0] - sum(n for s, n in others if s < start)
            free = prompt.region[1] - prompt.region[0] - sum(n for _, n in prompt.needles)
            assert abs(hay_before - depth * free) <= 1, (hay_before, depth, free)
            text = tok.decode(prompt.ids[start : start + size])
            assert ("magic number" in text) or text.startswith(" VAR"), text
        ids = prompt.ids
        k = len(scored_positions(prompt))
        assert score(prompt, torch.ones(k)) == 1.0 and score(prompt, torch.zeros(k)) == 0.0
        for wrong, expected in ((False, 1.0), (True, 0.0)):
            _, correct = ring_prefill_scores(Oracle(ids, 258, wrong), ids[None], scored_positions(prompt))
            assert score(prompt, correct[0]) == expected
        if len(prompt.items) > 1:  # RULER's string_match_all: the fraction of the items recalled
            first = prompt.items[0][1] - prompt.items[0][0]
            partial = torch.ones(k)
            partial[first - 1] = 0
            assert score(prompt, partial) == pytest.approx(1 - 1 / len(prompt.items))


def test_a_million_token_prompt_is_built_without_per_token_lists():
    """Counted in Python heap bytes, not seconds: a list of 2**20 token ids alone is 8 MiB of
    pointers, while the prompt is built from tensors (whose memory tracemalloc does not see)."""
    import tracemalloc

    builder = Builder(byte_tokenizer())
    builder.build("niah_multikey", 4096, 0.5, random.Random(0))  # caches filled outside the count
    tracemalloc.start()
    try:
        prompt = builder.build("niah_multikey", 1 << 20, 0.5, random.Random(0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert prompt.ids.shape == (1 << 20,) and peak < 2**20, f"{peak} bytes of Python objects"


def test_effective_length_rule():
    assert effective_length({1024: 0.95, 2048: 0.90, 4096: 0.86, 8192: 0.70}) == 4096
    assert effective_length({1024: 0.95, 2048: 0.80, 4096: 0.90}) == 1024  # must stay above: no comeback
    assert effective_length({1024: 0.5, 2048: 0.9}) == 0
    assert effective_length({1024: 0.856}) == 1024  # at the threshold counts
    assert effective_length({1024: 0.7, 2048: 0.6}, threshold=0.6) == 2048
    scores = {("niah_single", 512): 1.0, ("vt", 512): 0.5, ("niah_single", 1024): 0.0, ("vt", 1024): 0.5}
    assert task_means(scores) == {512: 0.75, 1024: 0.25}


def _model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _reference(model, ids, positions):
    """nll and argmax hits of an unpatched model over the whole prompt (no ring, no group)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, positions].float()
    targets = ids[:, positions + 1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return nll, (logits.argmax(-1) == targets).float()


def _ring_worker(rank, world):
    import ringpatch

    tok = byte_tokenizer()
    reference, model = _model(), ringpatch.patch_model(_model(), layout="zigzag")
    ring, _ = ruler_scores(model, tok, TASKS, [512], [0.3], 1, layout="zigzag")
    builder = Builder(tok)
    for task in TASKS:
        depth = 0.3 if task != "cwe" else None
        prompt = builder.build(task, 512, depth, random.Random(f"0-{task}-512-{depth}-0"))  # as ruler_scores seeds
        positions = scored_positions(prompt)
        nll, correct = ring_prefill_scores(model, prompt.ids[None], positions, layout="zigzag")
        ref_nll, ref_correct = _reference(reference, prompt.ids[None], positions)
        torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)
        assert torch.equal(correct, ref_correct)
        assert ring[(task, 512)] == score(prompt, ref_correct[0])


@pytest.mark.multiprocess
def test_ring_prefill_scores_equal_one_unpatched_process():
    spawn(_ring_worker, 2)


def test_min_lengths_and_the_tokenizer_check():
    builder = Builder(byte_tokenizer())
    lengths = {t: min_length(builder, t) for t in TASKS}
    assert all(0 < n <= 512 for n in lengths.values()), lengths
    with pytest.raises(ValueError, match="the template alone needs"):
        builder.build("niah_single", lengths["niah_single"] - 16, 0.5, random.Random(0))
    check_tokenizer(byte_tokenizer())

    class Lossy:  # maps every digit to one token: "1234567" cannot round-trip
        name_or_path = "lossy"
        unk_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [0 if c.isdigit() else ord(c) for c in text]}

        def decode(self, ids):
            return "".join("0" if i == 0 else chr(i) for i in ids)

    with pytest.raises(ValueError, match=r"the tokenizer 'lossy' does not encode the needle alphabet faithfully"):
        check_tokenizer(Lossy())


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "tiny"
    _model().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ruler-tasks", "niah_single", "--ruler-lengths", "128"],
         "eval.ruler_lengths 128 is below the niah_single template's minimum of 160 tokens"),
        (["--ruler-tasks", "vt", "--ruler-lengths", "512", "--depths", "1.5"],
         "eval.passkey_depths must be one or more fractions in [0, 1], got [1.5]"),
        (["--ruler-tasks", "vt", "--ruler-lengths", "512", "--ruler-threshold", "1.5"],
         "eval.ruler_threshold must be a finite number in [0.0, 1.0], got 1.5"),
        (["--ruler-tasks", "vt", "--ruler-lengths", "512", "--ruler-haystack", "data"],
         "eval.ruler_haystack: data needs held-out data"),
        (["--ruler-tasks", "vt", "--ruler-lengths", "1024", "512"], "eval.ruler_lengths must be positive and increasing"),
    ],
)  # fmt: skip
def test_bad_ruler_settings_are_refused_before_any_model(argv, message, model_folder, monkeypatch, capsys):
    import torch.distributed as dist

    def refuse(*a, **k):
        raise AssertionError("a model or group was started before the bad input was refused")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(dist, "init_process_group", refuse)
    assert eval_main(["--model", str(model_folder), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_an_unknown_task_is_refused_by_the_command_and_the_recipe(capsys):
    from ringpatch.train.recipe import EvalSpec, from_dict

    with pytest.raises(SystemExit):
        eval_main(["--model", "x", "--ruler-tasks", "needle"])
    assert "invalid choice: 'needle'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"eval.ruler_tasks\[0\] must be one of \['niah_single'"):
        from_dict(EvalSpec, {"ruler_tasks": ["needle"]}, "eval")
