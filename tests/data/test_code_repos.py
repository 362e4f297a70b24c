"""data/make_code_repos.py: one document per repository, its text files in path order, each under
its path; vendored folders and binary files left out; a folder with no repository refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ringpatch.data.prepare import count_tokens
from ringpatch.data.tokenizer import byte_tokenizer
from ringpatch.plan.recipe import DataSpec, from_dict
from tests.helpers import ROOT

pytestmark = pytest.mark.unit
SCRIPT = ROOT / "data" / "make_code_repos.py"


def test_each_repository_becomes_one_document_that_prepare_reads(tmp_path):
    clones = tmp_path / "clones"
    (clones / "alpha" / "pkg").mkdir(parents=True)
    (clones / "alpha" / "pkg" / "b.py").write_text("def b():\n    return 2\n")
    (clones / "alpha" / "a.py").write_text("import pkg.b\n")
    (clones / "alpha" / "node_modules").mkdir()
    (clones / "alpha" / "node_modules" / "dep.js").write_text("vendored();\n")
    (clones / "alpha" / "logo.png").write_bytes(b"\x89PNG\x00\xff")
    (clones / "beta").mkdir()
    (clones / "beta" / "main.rs").write_text("fn main() {}\n")
    run = subprocess.run([sys.executable, str(SCRIPT), str(clones), str(tmp_path / "out")], capture_output=True,
                         text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    docs = [json.loads(line) for line in (tmp_path / "out" / "repos.jsonl").read_text().splitlines()]
    assert [d["repo"] for d in docs] == ["alpha", "beta"]
    assert docs[0]["text"] == "# a.py\nimport pkg.b\n\n# pkg/b.py\ndef b():\n    return 2\n"
    spec = from_dict(DataSpec, {"source": str(tmp_path / "out")}, "data")
    assert count_tokens(spec, spec.source, "train", byte_tokenizer(), 10**6) == sum(len(d["text"]) + 1 for d in docs)


def test_a_folder_without_repositories_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "empty"), str(tmp_path / "out")],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and "no repository under" in run.stderr, run.stderr
