"""The commands' flags: a repeated flag gathers (lists) or is refused, never the last one silently."""

from __future__ import annotations

import pytest

from ringpatch.flags import Parser

pytestmark = pytest.mark.unit


def test_a_list_flag_given_twice_gathers_both():
    from ringpatch.evaluate.command import build_parser

    args = build_parser().parse_args(
        ["--model", "a", "--model", "b", "c", "--ppl-lengths", "128", "--ppl-lengths", "256"]
    )
    assert args.model == ["a", "b", "c"] and args.ppl_lengths == [128, 256]


@pytest.mark.parametrize("argv", [["--nodes", "1", "--nodes", "2"], ["--nodes=1", "--nodes", "2"]])
def test_a_single_flag_given_twice_is_refused(argv, capsys):
    from ringpatch.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["plan", "--recipe", "r.yaml", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err == "ringpatch plan: --nodes is given twice (--nodes again); give it once (see ringpatch plan --help)\n"


def test_values_that_look_like_flags_are_values():
    parser = Parser(prog="p")
    parser.add_argument("--x", type=float)
    parser.add_argument("--keep", action="store_true")
    assert parser.parse_args(["--x", "-5", "--keep"]).x == -5.0
    with pytest.raises(SystemExit):
        parser.parse_args(["--keep", "--keep"])


def test_report_into_a_folder_it_cannot_write_is_one_line(tmp_path, capsys):
    """`ringpatch report` where run_dir/report cannot be made (here a file holds the name; a
    read-only folder fails the same way): one line naming the folder, exit 2."""
    import json

    from ringpatch.cli import main

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    (tmp_path / "report").write_text("not a folder")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ringpatch report: cannot write {tmp_path}/report:") and len(err.splitlines()) == 1, err
