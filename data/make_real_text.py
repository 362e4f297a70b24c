"""Real long documents with nothing downloaded: Python's standard library and its documentation.

python data/make_real_text.py [--out data/real-text]          # what `make real-text` runs

Each package of the standard library this interpreter runs on (asyncio, email, ...) becomes one
document, its source files joined in path order as data/make_code_repos.py joins a repository
(code repositories are among the best long-context data: ProLong, arXiv:2410.02660), and the
documentation topics of `pydoc_data` (the language and library reference pydoc serves) are one
more document of prose. The packages in EVAL are held out (eval.jsonl, the documentation first);
the rest is train.jsonl. The text depends on the Python version, which manifest.json records with
each document's size.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_code_repos import repository_text  # noqa: E402

EVAL = ("email", "http", "logging", "xmlrpc")
"""Held-out packages: each 20K-100K tokens of SmolLM2's tokenizer, so each evaluates contexts of 16K."""
SKIP = {"test", "site-packages", "idlelib", "lib2to3", "tkinter", "turtledemo", "encodings", "ensurepip", "pydoc_data"}
"""Tests, vendored or generated code, GUI demos and data tables (and the build's config-* folder): not what a
user's long document reads like."""


def documents(stdlib: Path) -> dict[str, str]:
    """{name: text}: the documentation, then each package in name order."""
    from pydoc_data.topics import topics

    docs = {"python-docs": "\n\n".join(f"# {name}\n{topics[name].strip()}" for name in sorted(topics))}
    for package in sorted(
        p for p in stdlib.iterdir() if p.is_dir() and p.name not in SKIP and not p.name.startswith("config-")
    ):
        text = repository_text(package)
        if len(text) > 1000:  # config folders and stubs hold no document
            docs[package.name] = text
    return docs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "real-text")
    args = parser.parse_args(argv)
    docs = documents(Path(sysconfig.get_paths()["stdlib"]))
    held_out = ("python-docs", *EVAL)
    missing = [name for name in EVAL if name not in docs]
    if missing:
        print(f"make_real_text: this Python's standard library lacks the held-out packages {missing}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    splits = {"eval": [n for n in held_out], "train": [n for n in docs if n not in held_out]}
    for split, names in splits.items():
        partial = args.out / f".{split}.jsonl.partial"
        with open(partial, "w") as f:
            for name in names:
                f.write(json.dumps({"text": docs[name], "name": name}) + "\n")
        partial.rename(args.out / f"{split}.jsonl")
    manifest = {"python": platform.python_version(), "characters": {n: len(t) for n, t in docs.items()}, **splits}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    chars = {split: sum(len(docs[n]) for n in names) for split, names in splits.items()}
    print(
        f"make_real_text: Python {manifest['python']}: {len(splits['train'])} training documents "
        f"({chars['train'] / 1e6:.1f} M characters), {len(held_out)} held out ({chars['eval'] / 1e6:.1f} M) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
