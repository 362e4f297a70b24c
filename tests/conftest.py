"""Test tiers. Every test carries one tier marker (a module's `pytestmark`, or its own marker,
which wins over the module's):

  unit          one process, no process group: the inner loop (`make test-fast`, under a minute)
  multiprocess  real gloo groups spawned in this process (tests.helpers.procs.spawn)
  e2e           commands as users run them: torchrun, deepspeed, accelerate, make, the scripts
  gpu           needs CUDA; skipped without it

`pytest --tier unit` (or several: `--tier unit --tier multiprocess`) runs those tiers only;
plain `pytest` runs them all (`make test`, CI).
"""

from __future__ import annotations

import pytest
import torch

TIERS = ("unit", "multiprocess", "e2e", "gpu")


def pytest_addoption(parser):
    parser.addoption("--tier", action="append", choices=TIERS, help="run only the tests of this tier (repeatable)")
    parser.addoption(
        "--fuzz-examples", type=int, default=300, help="examples of the bad-input fuzzer (make fuzz: more)"
    )
    parser.addoption("--fuzz-tally", help="write the fuzzer's outcomes and refusals by class to this JSON file")


def pytest_configure(config):
    for tier in TIERS:
        config.addinivalue_line("markers", f"{tier}: test tier (tests/conftest.py)")


def tier_of(item) -> str:
    """The closest tier marker: the test's own, else its class's, else its module's."""
    for marker in item.iter_markers():
        if marker.name in TIERS:
            return marker.name
    raise pytest.UsageError(f"{item.nodeid} has no tier marker; give it one of {TIERS} (tests/conftest.py)")


def pytest_collection_modifyitems(config, items):
    wanted = config.getoption("tier")
    selected, deselected = [], []
    for item in items:
        tier = tier_of(item)
        if tier == "gpu" and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        (selected if not wanted or tier in wanted else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The generated corpus (train and held-out jsonl), one per test module (the trainer's and the
    plan's tests)."""
    from tests.helpers.trainrun import corpus

    return corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def demo_corpus():
    """data/demo as `make demo` writes it (the shipped tiny recipe reads it), written here if missing:
    CI's checkout is clean."""
    from pathlib import Path

    from ringpatch.data.corpus import write_corpus

    folder = Path(__file__).resolve().parent.parent / "data" / "demo"
    if not ((folder / "train.jsonl").is_file() and (folder / "eval.jsonl").is_file()):
        write_corpus(folder)
    return folder
