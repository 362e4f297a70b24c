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
    encode_answer,
    generate_answer,
    min_length,
    ruler_scores,
    score,
    score_generated,
    score_prompt,
    scored_positions,
    task_means,
)
from tests.helpers.bpe import train_bpe
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
        end = prompt.items[-1][1]  # the answer, then room to reorder it
        assert length - 2 * len(prompt.items) <= end <= length
        whole = tok(prompt.question + " " + ", ".join(prompt.answers), add_special_tokens=False)["input_ids"]
        assert prompt.ids[prompt.tail : end].tolist() == whole
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


@pytest.fixture(scope="module")
def bpe():
    """A GPT-2-style byte-level BPE trained here on the task templates."""
    rng, builder = random.Random(0), Builder(byte_tokenizer())
    lines = []
    for _ in range(400):
        k, v = builder.word(rng), builder.number(rng)
        lines += [f"The magic number for {k} is {v}. What is the magic number for {k}? It is {v}, {builder.number(rng)}.",
                  f"VAR {k.upper()} = {v}. Which variables are assigned the value {v}? They are {k.upper()}, {k}."]  # fmt: skip
    return train_bpe(lines)


class Answers(torch.nn.Module):
    """A 'model' that answers the prompt's question with `answers` (in its own order), encoded whole
    as text would be: after each prefix of its answer it predicts the next token, and anything
    after a prefix it would not have written gets token 0."""

    def __init__(self, prompt, tokenizer, answers, vocab: int):
        super().__init__()
        tail, _ = encode_answer(tokenizer, prompt.question, answers)
        self.text = torch.cat([prompt.ids[: prompt.tail], tail])
        self.vocab = vocab

    def forward(self, input_ids, position_ids, logits_to_keep, **_):
        out = []
        for p in logits_to_keep.tolist():
            ok = p + 1 < len(self.text) and torch.equal(input_ids[0, : p + 1], self.text[: p + 1])
            out.append(int(self.text[p + 1]) if ok else 0)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(torch.tensor(out), self.vocab).float()[None] * 50)


@pytest.mark.parametrize("wording", ["short", "ruler"])
@pytest.mark.parametrize("task", TASKS)
def test_the_generation_scorer_agrees_with_teacher_forcing(task, wording, bpe):
    """On models that answer in the template's format (right, permuted, half right, wrong), greedy
    generation matched as RULER matches text gives the teacher-forced score, with the BPE."""
    builder = Builder(bpe, wording=wording)
    vocab = len(bpe)
    prompt = builder.build(task, 1024, 0.5 if task != "cwe" else None, random.Random(f"gen-{task}"))
    answers = [prompt.answers, [a[::-1] + "x" for a in prompt.answers]]
    if len(prompt.answers) > 1:
        answers += [prompt.answers[::-1], [*prompt.answers[1:][::-1], "0000000"]]
    for given in answers:
        model = Answers(prompt, bpe, given, vocab)
        written = bpe.decode(generate_answer(model, prompt).tolist())
        assert score_generated(prompt, written) == pytest.approx(score_prompt(model, builder, prompt)), written
    # through ruler_scores: its own prompts, which this model does not know (it writes token 0)
    scores, _ = ruler_scores(Answers(prompt, bpe, prompt.answers, vocab), bpe, [task], [1024], [0.5], 1,
                             scorer="generate", wording=wording)  # fmt: skip
    assert scores[(task, 1024)] == 0.0
    with pytest.raises(ValueError, match=r"scorer must be one of \['teacher', 'generate'\], got 'sample'"):
        ruler_scores(None, bpe, [task], [1024], [0.5], 1, scorer="sample")


@pytest.mark.parametrize("wording", ["short", "ruler"])
@pytest.mark.parametrize("task", TASKS)
def test_answers_in_the_texts_own_tokens_and_in_any_order_score_one(task, wording, bpe):
    """With a BPE whose numbers and words carry their space, the answer is the whole text's
    encoding: a model that writes the answer as text (" 3141592", not " " then "3141592") scores
    1.0, and one that lists every item in another order scores 1.0 on the multi-item tasks, while
    the question-order scorer gives it less; a wrong answer scores 0. In both wordings."""
    builder = Builder(bpe, wording=wording)
    apart = bpe("It is ")["input_ids"] + bpe("3141592")["input_ids"]
    assert apart != bpe("It is 3141592")["input_ids"]  # the tokenizer shows the problem
    vocab = len(bpe)
    for depth in (0.2, 0.8) if task != "cwe" else (None,):
        prompt = builder.build(task, 1024, depth, random.Random(f"bpe-{task}-{depth}"))
        first = bpe.convert_ids_to_tokens(int(prompt.ids[prompt.items[0][0]]))
        assert first.startswith("\u0120"), first  # the first answer token carries the space (GPT-2's 'Ġ')
        text = bpe.decode(prompt.ids[prompt.tail : prompt.items[-1][1]])
        assert bpe(text)["input_ids"] == prompt.ids[prompt.tail : prompt.items[-1][1]].tolist()
        assert score_prompt(Answers(prompt, bpe, prompt.answers, vocab), builder, prompt) == 1.0
        wrong = [a[::-1] + "x" for a in prompt.answers]
        assert score_prompt(Answers(prompt, bpe, wrong, vocab), builder, prompt) == 0.0
        if len(prompt.answers) > 1:
            permuted = Answers(prompt, bpe, prompt.answers[::-1], vocab)
            assert score_prompt(permuted, builder, prompt) == 1.0
            assert score_prompt(permuted, builder, prompt, ordered=True) < 1.0
            half = [*prompt.answers[1:][::-1], "0000000"]  # all but the first item, in another order, then junk
            expected = (len(prompt.answers) - 1) / len(prompt.answers)
            assert score_prompt(Answers(prompt, bpe, half, vocab), builder, prompt) == pytest.approx(expected)


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
    assert effective_length({1024: 0.95, 2048: 0.80, 4096: 0.90}, rule="any") == 4096  # RULER's tables' reading
    assert effective_length({1024: 0.5, 2048: 0.9}, rule="any") == 2048
    with pytest.raises(ValueError, match="rule must be 'prefix' or 'any'"):
        effective_length({1024: 0.9}, rule="ruler")
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
    import torch.distributed as dist

    import ringpatch

    tok = byte_tokenizer()
    reference, model = _model(), ringpatch.patch_model(_model(), layout="zigzag")
    alone = [dist.new_group([r]) for r in range(world)][rank]  # the reference: the whole prompt on one rank
    ring, _ = ruler_scores(model, tok, TASKS, [512], [0.3], 1, layout="zigzag")
    ring_ordered, _ = ruler_scores(model, tok, TASKS, [512], [0.3], 1, layout="zigzag", ordered=True)
    builder = Builder(tok)
    for task in TASKS:
        depth = 0.3 if task != "cwe" else None
        prompt = builder.build(task, 512, depth, random.Random(f"0-{task}-512-{depth}-0"))  # as ruler_scores seeds
        positions = scored_positions(prompt)
        nll, correct = ring_prefill_scores(model, prompt.ids[None], positions, layout="zigzag")
        ref_nll, ref_correct = _reference(reference, prompt.ids[None], positions)
        torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)
        assert torch.equal(correct, ref_correct)
        assert ring_ordered[(task, 512)] == score(prompt, ref_correct[0])
        assert ring[(task, 512)] == score_prompt(reference, builder, prompt, group=alone)


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
         "eval.ruler_lengths 128 is below the niah_single template's minimum of 176 tokens"),
        (["--ruler-tasks", "vt", "--ruler-lengths", "512", "--depths", "1.5"],
         "eval.passkey_depths must be one or more fractions in [0, 1], got [1.5]"),
        (["--ruler-tasks", "vt", "--ruler-lengths", "512", "--ruler-threshold", "1.5"],
         "eval.ruler_threshold must be a finite number in [0.0, 1.0], got 1.5"),
        (["--ruler-tasks", "vt", "--ruler-lengths", "512", "--ruler-haystack", "data"],
         "eval.ruler_haystack: data needs held-out data"),
        (["--ruler-tasks", "vt", "--ruler-lengths", "1024", "512"], "eval.ruler_lengths must be positive and increasing"),
        (["--ruler-tasks", "vt", "--ruler-lengths", "512", "--ruler-value-digits", "0"],
         "eval.ruler_value_digits must be"),
        (["--ruler-tasks", "niah_single", "--ruler-lengths", "176", "--ruler-wording", "ruler"],
         "eval.ruler_lengths 176 is below the niah_single template's minimum of"),
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


@pytest.mark.parametrize(
    "argv",
    [["--passkey-lengths", "256"], ["--ruler-tasks", "niah_single", "--ruler-lengths", "512"]],
    ids=["plain", "ruler"],
)
def test_a_model_folder_without_a_tokenizer_is_refused_before_any_model(argv, model_folder, monkeypatch, capsys):
    """Weights saved without their tokenizer (save_pretrained of the model alone): the command names
    the folder and the fix before it loads a model or starts a group, with or without RULER tasks."""
    import torch.distributed as dist

    def refuse(*a, **k):
        raise AssertionError("a model or group was started before the bad input was refused")

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_folder / name).unlink()
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(dist, "init_process_group", refuse)
    assert eval_main(["--model", str(model_folder), *argv]) == 2
    err = capsys.readouterr().err
    assert f"model folder {model_folder} holds no tokenizer transformers can load" in err, err
    assert "tokenizer.save_pretrained(" in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_an_unknown_task_is_refused_by_the_command_and_the_recipe(capsys):
    from ringpatch.evaluate.spec import EvalSpec
    from ringpatch.plan.recipe import from_dict

    with pytest.raises(SystemExit):
        eval_main(["--model", "x", "--ruler-tasks", "needle"])
    assert "invalid choice: 'needle'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"eval.ruler_tasks\[0\] must be one of \['niah_single'"):
        from_dict(EvalSpec, {"ruler_tasks": ["needle"]}, "eval")


def test_the_wording_is_rulers_unless_the_tokenizer_is_byte_level(bpe):
    """auto: RULER's words for a tokenizer that knows them (>= 2 characters a token), the short form
    for the byte tokenizer, and for a BPE too small to have learnt RULER's words."""
    from ringpatch.data.tasks import WORDING, wording_for

    english = train_bpe([text for text in WORDING["ruler"].values()] * 20 + ["The grass is green. " * 5] * 20)
    assert wording_for(english) == "ruler"
    assert wording_for(byte_tokenizer()) == "short" and wording_for(bpe) == "short"
    assert wording_for(english, "short") == "short"
    prompt = Builder(english).build("niah_single", 1024, 0.5, random.Random(0))
    text = english.decode(prompt.ids[: prompt.items[-1][1]].tolist())
    assert text.startswith(WORDING["ruler"]["niah_intro"]) and "mentioned in the provided text is " in text
    assert "One of the special magic numbers for" in text
    with pytest.raises(ValueError, match=r"wording must be one of \['auto', 'short', 'ruler'\], got 'long'"):
        Builder(english, wording="long")
