"""The bad-input class kept closed by a fuzzer: the shipped tiny recipe, its model config, its data,
its model folder, its command line and its environment mutated at random (hypothesis); every
example must end in one line that starts `ringpatch train: ` with exit 2, before any process group
or model, or reach the trainer with a recipe whose every value keeps the schema's own rules. A
traceback, any other exit, a model or group started, or an out-of-range value that reached the
trainer fails.

Most examples change the recipe, the model config or the data (the flags and environment change
in about a quarter), so the checks of the content, not the first flag read, are what it exercises.

    pytest tests/train/test_fuzz.py                 # CI: 300 examples, derandomized (the same every run)
    make fuzz                                       # 3000 (--fuzz-examples)
    pytest tests/train/test_fuzz.py --fuzz-tally t.json   # also write what refused each example, by class
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
MODEL_CONFIG = [("sliding_window", 0), ("sliding_window", -4), ("head_dim", 0), ("hidden_act", "swish2"),
                ("rope_theta", "1e4"), ("max_position_embeddings", 0), ("rms_norm_eps", math.nan),
                ("rope_scaling", {"rope_type": "yarn", "factor": 2.0, "beta_fastt": 32}),
                ("rope_scaling", {"rope_type": "linear"}), ("num_key_value_heads", 3), ("tie_word_embeddings", "yes"),
                ("model_type", "llama4_text"), ("vocab_size", 2**40)]  # fmt: skip
"""Keys the ring, the RoPE rules, the plan or the export read, with values they must refuse."""
FLAGS = [["--max-steps", "0"], ["--max-steps", "3"], ["--max-steps", "3", "--max-steps", "4"], ["--run-dir", ""],
         ["--run-dir", "@file"], ["--deepspeed", "@folder"], ["--no-resume"], ["--no-resume", "--no-resume"]]  # fmt: skip
ENVIRONMENTS = [{"WORLD_SIZE": "2"}, {"WORLD_SIZE": "x"}, {"LOCAL_WORLD_SIZE": "999"},
                {"RANK": "0", "WORLD_SIZE": "2", "no launcher": True}, {"TORCHELASTIC_RESTART_COUNT": "3"},
                {"MASTER_PORT": "29500", "no launcher": True}]  # fmt: skip
SOURCES = ["@hidden", "@fifo", "@loop", "@empty-folder", "@trainfile-as-eval"]
"""Data discovery: a folder with hidden copies beside the data (valid), a named pipe, a symbolic link
loop, a folder of nothing, held-out data that is the training file."""
MODELS = ["@cutmodel", "@badconfig"]
"""A pretrained model folder whose weights are cut short, or whose config.json does not parse."""
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
    # hypothesis favours the first value of a range, so the common cases are the content's (== 0) and
    # the flags and environment the rare ones (== 3)
    if draw(st.integers(0, 2)) == 0:  # a key of the model config the ring and the export read
        key, value = draw(st.sampled_from(MODEL_CONFIG))
        if isinstance(r.get("model"), dict) and isinstance(r["model"].get("config"), dict):
            r["model"]["config"][key] = value
    if draw(st.integers(0, 3)) == 0:  # data found on disk, or a model folder, that no one meant
        where = draw(st.sampled_from(SOURCES + MODELS))
        if where in MODELS and isinstance(r.get("model"), dict):
            r["model"].update(name=where, init="pretrained", config=None)
        elif isinstance(r.get("data"), dict):
            r["data"]["eval_source" if where == "@trainfile-as-eval" else "source"] = where
    lines = draw(st.lists(st.sampled_from(BAD_LINES), max_size=2))
    flags = draw(st.sampled_from(FLAGS)) if draw(st.integers(0, 3)) == 3 else []
    env = draw(st.sampled_from(ENVIRONMENTS)) if draw(st.integers(0, 3)) == 3 else {}
    return r, lines, flags, env


def _base(tmp: Path, data: Path) -> dict:
    return yaml.safe_load(recipe(tmp, data).read_text())


def _keeps_the_schema(obj, prefix: str = "") -> list[str]:
    """The fields of a validated recipe (dataclasses, nested) whose value breaks its own declared
    type, choices or range: what reaching the trainer must never carry."""
    import dataclasses
    import types
    import typing

    from ringpatch.schema import markers

    def fits(value, hint) -> bool:
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is typing.Annotated:
            return fits(value, args[0])
        if origin in (typing.Union, types.UnionType):
            return any(fits(value, a) for a in args)
        if hint is type(None):
            return value is None
        if origin is typing.Literal:
            return value in args
        if origin is tuple:
            if not isinstance(value, tuple):
                return False
            items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
            return len(items) == len(value) and all(fits(v, a) for v, a in zip(value, items, strict=True))
        if hint is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if hint is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if dataclasses.is_dataclass(hint):
            return isinstance(value, hint)
        return isinstance(value, origin or hint) if isinstance(origin or hint, type) else True

    bad = []
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        where, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if not fits(value, hints[f.name]):
            bad.append(f"{where}={value!r}")
            continue
        for marker in markers(hints[f.name]):
            for item in value if isinstance(value, tuple) else (value,):
                try:
                    marker.check(where, item)
                except (ValueError, FileNotFoundError) as e:
                    if not isinstance(e, FileNotFoundError):  # a path checked where it is read
                        bad.append(str(e))
        for item in value if isinstance(value, tuple) else (value,):
            if dataclasses.is_dataclass(item):
                bad += _keeps_the_schema(item, f"{where}.")
    return bad


def _files(tmp_path: Path, data: Path) -> dict[str, str]:
    """What an "@name" in an example stands for: files and folders made once."""
    import os

    import transformers

    from tests.helpers.models import CONFIGS

    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "empty-folder").mkdir()
    hidden = tmp_path / "hidden"
    (hidden / ".ipynb_checkpoints").mkdir(parents=True)
    (hidden / "train.jsonl").write_bytes((data / "train.jsonl").read_bytes())
    (hidden / ".ipynb_checkpoints" / "train-checkpoint.jsonl").write_bytes((data / "train.jsonl").read_bytes())
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "loop-b", tmp_path / "loop-a")
    os.symlink(tmp_path / "loop-a", tmp_path / "loop-b")
    transformers.LlamaForCausalLM(CONFIGS["llama"]()).save_pretrained(tmp_path / "cutmodel")
    weights = tmp_path / "cutmodel" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    (tmp_path / "badconfig").mkdir()
    (tmp_path / "badconfig" / "config.json").write_text('{"model_type": "llama",')
    named = {"@file": "a-file", "@folder": "a-folder", "@empty-folder": "empty-folder", "@hidden": "hidden",
             "@fifo": "fifo", "@loop": "loop-a", "@cutmodel": "cutmodel", "@badconfig": "badconfig"}  # fmt: skip
    return {k: str(tmp_path / v) for k, v in named.items()} | {"@trainfile-as-eval": str(data / "train.jsonl")}


CLASSES = (
    ("is not valid YAML", "recipe YAML"), ("unknown keys", "recipe: unknown key"), ("config.json", "model files"),
    (".safetensors", "model files"), ("model.config", "model config"), ("model.", "model"), ("stages[", "stages"),
    ("data source", "data discovery"), ("data.eval_source", "data discovery"), (", line ", "data records"),
    ("data.", "data keys"), ("WORLD_SIZE", "launch environment"), ("RANK", "launch environment"),
    ("TORCHELASTIC", "launch environment"), ("ranks were launched", "launch environment"), ("--", "flags"),
    ("parallel.", "grid"), ("zero.", "ZeRO"), ("optim.", "optimizer"), ("eval.", "eval keys"), ("DeepSpeed", "DeepSpeed"),
)  # fmt: skip
"""What a refusal is about, by the first words it contains (the tally of `--fuzz-tally`)."""


def _refused_by(line: str) -> str:
    return next((kind for words, kind in CLASSES if words in line), "recipe: " + line.split()[2].split(".")[0])


LAUNCHER = {"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
ENV_KEYS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "RINGPATCH_OVERSUBSCRIBE", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID")  # fmt: skip


def test_no_bad_input_gets_past_a_check_or_out_as_a_traceback(tmp_path, data, monkeypatch, capsys, request,
                                                                no_model_loads):  # fmt: skip
    examples = request.config.getoption("fuzz_examples")
    base = _base(tmp_path, data)
    counter = itertools.count()
    files = _files(tmp_path, data)
    capsys.readouterr()  # what making them printed
    outcomes, tally = {"refused": 0, "valid": 0}, {}
    reached_plans = []

    def reached(self, plan, *args, **kwargs):
        reached_plans.append(plan)
        raise Reached

    monkeypatch.setattr(loop.Trainer, "__init__", reached)
    monkeypatch.chdir(tmp_path)  # a mutated run_dir may be relative: its lock lands here, not in the checkout

    # derandomized: the same examples on every run, so a CI failure reproduces; more of them with make fuzz.
    # Health checks on but two: the function-scoped fixtures are the test's own (reset per example), and
    # an example is a whole preflight (data read, config built), slow by design.
    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
    @given(mutations(base))
    def one(example):
        r, lines, flags, env = example
        n = next(counter)
        folder = tmp_path / f"ex{n}"
        folder.mkdir()
        text = json.dumps(r, default=str)
        for name, target in files.items():
            text = text.replace(json.dumps(name), json.dumps(target))
        r = json.loads(text)
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
        argv = ["--recipe", str(path)] + [files.get(a, a) for a in flags]
        for key in ENV_KEYS:
            monkeypatch.delenv(key, raising=False)
        env = dict(env)
        if "WORLD_SIZE" in env and not env.pop("no launcher", False):  # as a launcher sets them
            env = LAUNCHER | env
        env.pop("no launcher", None)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        try:
            code = train_main(argv)
        except SystemExit as stop:  # the flags' parser: its own one line
            code = stop.code
        except Reached:
            broken = _keeps_the_schema(reached_plans[-1].recipe)
            assert not broken, (argv, r, broken)  # a value the schema refuses reached the trainer
            outcomes["valid"] += 1
            return
        err = capsys.readouterr().err
        assert code == 2, (argv, r, err)
        lines_out = [line for line in err.splitlines() if line.strip()]
        assert len(lines_out) == 1 and lines_out[0].startswith("ringpatch train: "), (argv, r, err)
        assert "Traceback" not in err
        outcomes["refused"] += 1
        kind = _refused_by(lines_out[0])
        tally[kind] = tally.get(kind, 0) + 1

    one()
    tally_path = request.config.getoption("fuzz_tally")
    if tally_path:
        Path(tally_path).write_text(json.dumps({"outcomes": outcomes, "refused_by": tally}, indent=1, sort_keys=True))
    assert outcomes["refused"] > 0 and outcomes["valid"] > 0, outcomes
    assert sum(outcomes.values()) >= 0.9 * examples, outcomes  # hypothesis ran (about) every example asked for
