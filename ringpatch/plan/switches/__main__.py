"""`python -m ringpatch.plan.switches`: write the switches' table into docs/memory.md (between its
markers), from the registry; `--check` exits 1 when the docs' table differs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ringpatch.errors import BadValue
from ringpatch.plan.switches import table

DOC = Path(__file__).resolve().parents[3] / "docs" / "memory.md"
BEGIN = "<!-- the switches' table: written by `python -m ringpatch.plan.switches` from plan/switches -->"
END = "<!-- end of the switches' table -->"


def with_table(text: str) -> str:
    """`text` with the part between the markers replaced by the registry's table."""
    head, found, rest = text.partition(BEGIN)
    _, found_end, tail = rest.partition(END)
    if not (found and found_end):
        raise BadValue(f"{DOC} has no switches' table markers ({BEGIN!r} ... {END!r})")
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/memory.md's table is not the registry's")
    args = parser.parse_args(argv)
    text = DOC.read_text()
    wanted = with_table(text)
    if args.check:
        if wanted != text:
            print(f"{DOC}: the switches' table differs from plan/switches; run python -m ringpatch.plan.switches")
            return 1
        return 0
    DOC.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
