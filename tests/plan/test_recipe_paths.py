"""A recipe's relative paths are read beside it (the current folder as the fallback), so recipes run
from any folder; `ringpatch init` writes the shipped files out for a pip-installed user."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from ringpatch import shipped
from ringpatch.cli import main as cli
from ringpatch.errors import BadValue, Missing
from ringpatch.plan.recipe import load_recipe

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
RECIPE = {
    "model": {"name": "base", "init": "pretrained"},
    "parallel": {"sp": 2},
    "stages": [{"seq_len": 256, "steps": 1}],
    "data": {"sources": [{"source": "texts/train.jsonl", "weight": 1.0}], "eval_source": "texts/eval.jsonl"},
    "deepspeed": "ds.json",
    "run_dir": "runs/here",
}


def _write(folder: Path, recipe: dict, files=("ds.json", "texts/train.jsonl", "texts/eval.jsonl", "base/config.json")):
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_relative_paths_are_read_beside_the_recipe_from_any_folder(tmp_path, monkeypatch):
    path = _write(tmp_path / "project", RECIPE)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    r = load_recipe(path)
    beside = tmp_path / "project"
    assert r.deepspeed == str(beside / "ds.json") and r.model.name == str(beside / "base")
    assert r.data.sources[0].source == str(beside / "texts" / "train.jsonl")
    assert r.data.eval_source == str(beside / "texts" / "eval.jsonl")
    assert r.run_dir == "runs/here"  # where ringpatch writes: the current folder's


def test_inside_the_current_folder_paths_stay_relative(tmp_path, monkeypatch):
    """What a checkpoint records does not depend on where the recipe file lies, run from the root."""
    _write(tmp_path, {**RECIPE, "deepspeed": "../ds.json"}, files=("ds.json", "texts/train.jsonl", "texts/eval.jsonl"))
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text(yaml.safe_dump({**RECIPE, "deepspeed": "../ds.json"}))
    monkeypatch.chdir(tmp_path)
    assert load_recipe("recipes/r.yaml").deepspeed == "ds.json"


def test_the_current_folder_is_the_fallback(tmp_path, monkeypatch):
    """A path written relative to where commands run, with nothing of that name beside the recipe."""
    path = _write(tmp_path / "project", RECIPE, files=("base/config.json",))
    _write(tmp_path / "cwd", {}, files=("ds.json", "texts/train.jsonl", "texts/eval.jsonl"))
    monkeypatch.chdir(tmp_path / "cwd")
    r = load_recipe(path)
    assert r.deepspeed == "ds.json" and r.data.sources[0].source == "texts/train.jsonl"
    assert r.model.name == str(tmp_path / "project" / "base")


def test_a_path_in_both_places_is_refused(tmp_path, monkeypatch):
    path = _write(tmp_path / "project", RECIPE)
    _write(tmp_path / "cwd", {}, files=("ds.json",))
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(BadValue, match=r"deepspeed ds.json names two different things: .*project/ds.json beside the "
                       r"recipe and ds.json in the current folder.*absolute path"):  # fmt: skip
        load_recipe(path)


def test_a_missing_file_names_both_places(tmp_path, monkeypatch):
    path = _write(tmp_path / "project", RECIPE, files=("texts/train.jsonl", "texts/eval.jsonl"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Missing, match=r"deepspeed ds.json does not exist: not beside the recipe \(project/ds.json\) "
                       r"nor in the current folder \(ds.json\)"):  # fmt: skip
        load_recipe(path)


def test_hub_ids_and_synthetic_sources_stay_as_written(tmp_path, monkeypatch):
    recipe = {
        **RECIPE,
        "model": {"name": "meta-llama/Meta-Llama-3-8B", "config": {"model_type": "llama"}},
        "data": {
            "sources": [{"source": "synthetic:ruler", "weight": 1.0, "tasks": ["niah_single"]}],
            "max_sequences": 4,
        },
    }
    recipe.pop("deepspeed")
    path = _write(tmp_path / "project", recipe, files=())
    monkeypatch.chdir(tmp_path)
    r = load_recipe(path)
    assert r.model.name == "meta-llama/Meta-Llama-3-8B" and r.data.sources[0].source == "synthetic:ruler"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_shipped_recipes_load_from_another_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = load_recipe(ROOT / "recipes" / name)
    if r.deepspeed:
        assert Path(r.deepspeed) == ROOT / "launch" / "deepspeed" / Path(r.deepspeed).name
        assert Path(r.deepspeed).is_file()
    if r.model.name.startswith("/"):
        assert Path(r.model.name).parent == ROOT / "data", r.model.name


def test_init_writes_the_shipped_files_and_a_recipe_plans_from_there(tmp_path, monkeypatch, capsys):
    from ringpatch.plan import for_recipe

    out = tmp_path / "start"
    assert cli(["init", str(out)]) == 0
    for folder in shipped.FOLDERS:
        src = ROOT / folder
        assert sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file()) == sorted(
            p.relative_to(out / folder) for p in (out / folder).rglob("*") if p.is_file()
        )
    assert (out / "data" / "demo" / "train.jsonl").is_file() and (out / "data" / "demo" / "eval.jsonl").is_file()
    assert "ringpatch plan --recipe" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    plan = for_recipe(str(out / "recipes" / "tiny-cpu.yaml"), nodes=1, gpus_per_node=2, device="cpu")
    assert plan.recipe.model.name == str(out / "data" / "demo-base")
    assert plan.recipe.data.sources[0].source == str(out / "data" / "demo" / "train.jsonl")
    onenode = for_recipe(str(out / "recipes" / "llama3-8b-1m-1node.yaml"), nodes=1)
    assert onenode.recipe.deepspeed == str(out / "launch" / "deepspeed" / "zero3.json")
    assert "zero_optimization" in json.loads(Path(onenode.recipe.deepspeed).read_text())
    # a second time refuses, naming the files; --force overwrites
    assert cli(["init", str(out)]) == 2
    err = capsys.readouterr().err
    assert "files exist already" in err and "pass --force to overwrite" in err
    assert cli(["init", str(out), "--force"]) == 0


def test_setup_ships_the_same_folders():
    tree = ast.parse((ROOT / "setup.py").read_text())
    folders = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "FOLDERS"
    )
    assert folders == shipped.FOLDERS
    manifest = (ROOT / "MANIFEST.in").read_text().split()
    assert all(folder in manifest for folder in shipped.FOLDERS)


@pytest.mark.parametrize("value", ["ab/" * 1500, "../" * 2000 + "x", "x" * 300])
def test_a_path_too_long_for_the_file_system_is_refused(value, tmp_path):
    path = _write(tmp_path, {**RECIPE, "deepspeed": value})
    with pytest.raises(BadValue, match=r"deepspeed: the path (component .* is 300 bytes|is \d+ bytes, over the 4095)"):
        load_recipe(path)
