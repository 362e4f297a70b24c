"""The bad-input class kept closed by a fuzzer: the shipped tiny recipe, its data file, its command
line and its environment mutated at random (hypothesis); every example must end in one line that
starts `ringpatch train: ` with exit 2, before any process group or model, or reach the trainer
with a recipe that validates. A traceback, or any other exit, fails.

    pytest tests/train/test_fuzz.py                 # CI: 300 examples, derandomized (the same every run)
    make fuzz                                       # 3000 (--fuzz-examples)
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringpatch.train import loop
from ringpatch.train.command import main as train_main
from tests.helpers.trainrun import recipe

pytestmark = pytest.mark.unit


class Reached(BaseException):  # past `except Exception` in the trainer's failure path
    """The recipe got through every check: the trainer would start here."""


def _paths(tree, prefix=()):
    """Every key path of a nested recipe (lists by index)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        yield (*prefix, key)
        yield from _paths(value, (*prefix, key))


def _parent(tree, path):
    for key in path[:-1]:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    parent = _parent(tree, path)
    if value is _DELETE:
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
        return
    if isinstance(parent, dict) or isinstance(path[-1], int):
        parent[path[-1]] = value


_DELETE = object()
NASTY = [0, -1, 1, 2**31, 2**70, -(2**70), 0.5, 1e-9, -0.0, math.inf, -math.inf, math.nan, "", " ", "0", "3e-3",
         "auto", None, True, False, [], [1], {}, {"a": 1}, "../..", "/proc/self/status", "/nonexistent/x",
         "@file", "@folder", "\x00", "é"]  # fmt: skip
BAD_LINES = ['{"text": null}', '{"text": 7}', '{"body": "x"}', "[1, 2]", "{", '{"text": "   "}', '"just a string"',
             '{"text": ["a"]}', '{"text": "\\ud800"}']  # fmt: skip


@st.composite
def mutations(draw, base: dict):
    """A mutated recipe (as a dict), lines to append to the data file, extra flags, environment."""
    r = copy.deepcopy(base)
    paths = list(_paths(r))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        choice = draw(st.integers(0, 3))
        if choice == 0:
            _set(r, path, _DELETE)
        elif choice == 1:
            _set(r, path, draw(st.sampled_from(NASTY)))
        elif choice == 2:
            _set(r, path, draw(st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=8))))
        elif isinstance(_parent(r, path), dict):
            _set(r, (*path[:-1], draw(st.text("abcdefgh_", min_size=1, max_size=6))), 1)  # an unknown key
        paths = list(_paths(r))
    lines = draw(st.lists(st.sampled_from(BAD_LINES), max_size=2))
    flags = draw(st.sampled_from([[], ["--max-steps", "0"], ["--max-steps", "3"], ["--run-dir", ""],
                                  ["--run-dir", "@file"], ["--deepspeed", "@folder"], ["--no-resume"]]))  # fmt: skip
    env = draw(st.sampled_from([{}, {"WORLD_SIZE": "2"}, {"WORLD_SIZE": "x"}, {"LOCAL_WORLD_SIZE": "999"}]))
    return r, lines, flags, env


def _base(tmp: Path, data: Path) -> dict:
    return yaml.safe_load(recipe(tmp, data).read_text())


def test_no_bad_input_gets_past_a_check_or_out_as_a_traceback(tmp_path, data, monkeypatch, capsys, request):
    examples = request.config.getoption("fuzz_examples")
    base = _base(tmp_path, data)
    counter = itertools.count()
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    outcomes = {"refused": 0, "valid": 0}

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(loop.Trainer, "__init__", reached)

    # derandomized: the same examples on every run, so a CI failure reproduces; more of them with make fuzz
    @settings(max_examples=examples, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(mutations(base))
    def one(example):
        r, lines, flags, env = example
        n = next(counter)
        folder = tmp_path / f"ex{n}"
        folder.mkdir()
        r = json.loads(json.dumps(r, default=str).replace('"@file"', json.dumps(str(tmp_path / "a-file"))))
        if isinstance(r.get("run_dir"), str) and r["run_dir"] == base["run_dir"]:
            r["run_dir"] = str(folder / "run")  # each example its own run (and lock)
        if lines and isinstance(r.get("data"), dict) and isinstance(r["data"].get("source"), str):
            source = Path(r["data"]["source"])
            if source.is_file():
                bad = folder / "train.jsonl"
                bad.write_text(source.read_text() + "\n".join(lines) + "\n")
                r["data"]["source"] = str(bad)
        path = folder / "recipe.yaml"
        path.write_text(yaml.safe_dump(r, allow_unicode=True))
        argv = ["--recipe", str(path)] + [
            str(tmp_path / "a-file") if a == "@file" else str(tmp_path / "a-folder") if a == "@folder" else a
            for a in flags
        ]
        for key in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RINGPATCH_OVERSUBSCRIBE"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        try:
            code = train_main(argv)
        except Reached:
            outcomes["valid"] += 1
            return
        err = capsys.readouterr().err
        assert code == 2, (argv, r, err)
        lines_out = [line for line in err.splitlines() if line.strip()]
        assert len(lines_out) == 1 and lines_out[0].startswith("ringpatch train: "), (argv, r, err)
        assert "Traceback" not in err
        outcomes["refused"] += 1

    one()
    assert outcomes["refused"] > 0 and sum(outcomes.values()) >= min(examples, 50), outcomes
