"""The benches' targets: one table (bench/targets.py), every entry checked by a bench, every check
naming an entry, a miss (or a NaN) exiting 1, and README quoting the table's bounds."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.targets import TARGETS, Verdicts  # noqa: E402


def _checked() -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for path in sorted((ROOT / "bench").glob("*.py")):
        for name in re.findall(r'verdicts\.check\(\s*"([^"]+)"', path.read_text()):
            names.setdefault(name, set()).add(path.stem)
    return names


def test_every_check_names_a_target_and_every_target_is_checked():
    checked = _checked()
    assert set(checked) <= set(TARGETS), f"checks with no target: {sorted(set(checked) - set(TARGETS))}"
    assert set(TARGETS) <= set(checked), f"targets no bench checks: {sorted(set(TARGETS) - set(checked))}"
    for name, benches in checked.items():  # a target is named after the bench that checks it
        assert benches == {name.split(".")[0]}, (name, benches)


@pytest.mark.parametrize(
    "name,value,met",
    [
        ("attention.ring_vs_monolithic", 1.04, True),
        ("attention.ring_vs_monolithic", 1.06, False),
        ("simulate.planned_vs_simulated", 0.94, False),
        ("simulate.planned_vs_simulated", 1.0, True),
        ("memory.longest_on_vs_off", 1.9, False),
        ("memory.longest_on_vs_off", float("nan"), False),
        ("prepare.same_sequences", 1.0, True),
    ],
)
def test_a_miss_exits_1_and_is_named(capsys, name, value, met, tmp_path):
    verdicts = Verdicts(results=tmp_path)
    assert verdicts.check(name, value, "here") is met
    assert verdicts.exit_code() == (0 if met else 1)
    out = capsys.readouterr().out
    assert f"target {name} (here): " in out
    assert ("targets missed: " in out) is not met


def test_readme_quotes_the_table():
    readme = (ROOT / "README.md").read_text()
    quoted = re.findall(r"\| `python bench/(\w+)\.py[^`]*` \|", readme)
    assert quoted, "README's figures table names no bench"
    for row in re.findall(r"^\|[^\n]*target ≤ ([0-9.]+)[^\n]*`python bench/(\w+)\.py", readme, re.M):
        bound, bench = float(row[0]), row[1]
        highs = {high for name, (_, high, _) in TARGETS.items() if name.startswith(f"{bench}.")}
        assert bound in highs, f"README quotes target <= {bound} for bench/{bench}.py; bench/targets.py has {highs}"


def test_readme_figures_are_held_to_the_last_run(tmp_path):
    """bench/figures.py: every row it maps exists in README; a figure the last run printed passes,
    one it did not print (or a run that is missing) fails, naming the target."""
    import json

    from bench.figures import FIGURES, check, figure_cell

    readme = (ROOT / "README.md").read_text()
    for start, *_ in FIGURES:
        assert figure_cell(readme, start), f"README has no figures row starting '{start}'"
    fake = (
        "| ring vs monolithic attention, 2 ranks | 0.92–0.97 × the time (target ≤ 1.05) | x |\n"
        "| peak memory per rank, 2 ranks vs 1 process, 32K | 0.530 (target ≤ 0.60) | x |\n"
        "| plan / simulated peak, five cluster recipes, full depth | 1.000 | x |\n"
    )
    runs = {"attention": {"attention.ring_vs_monolithic": {"S=32768": 0.9249}},
            "model": {"model.memory_ratio": {"S=32768": 0.5301}},
            "simulate": {"simulate.planned_vs_simulated": {"a": 1.0002, "b": 0.9996}}}  # fmt: skip
    for bench, values in runs.items():
        (tmp_path / f"{bench}.json").write_text(json.dumps(values))
    assert [line.split(":")[0] for line in check(fake, tmp_path)] == [
        "ok attention.ring_vs_monolithic", "ok model.memory_ratio", "ok simulate.planned_vs_simulated"]  # fmt: skip
    runs["attention"]["attention.ring_vs_monolithic"]["S=16384"] = 1.04  # another length: not this row's
    assert check(fake, tmp_path)[0].startswith("ok ")
    runs["attention"]["attention.ring_vs_monolithic"]["S=32768"] = 0.99  # outside 0.92-0.97
    runs["model"]["model.memory_ratio"]["S=32768"] = 0.541
    for bench, values in runs.items():
        (tmp_path / f"{bench}.json").write_text(json.dumps(values))
    (tmp_path / "simulate.json").unlink()
    lines = check(fake, tmp_path)
    assert lines[0] == "WRONG attention.ring_vs_monolithic: README says 0.92-0.97, the last run printed 0.99"
    assert lines[1] == "WRONG model.memory_ratio: README says 0.530, the last run printed 0.541"
    assert lines[2] == "MISSING simulate.planned_vs_simulated: no results: run python bench/simulate.py"
