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
def test_a_miss_exits_1_and_is_named(capsys, name, value, met):
    verdicts = Verdicts()
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
