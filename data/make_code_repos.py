"""Code repositories as long documents, one per repository, for a data.sources mixture.

ProLong (Gao et al. 2024, arXiv:2410.02660) found code repositories, each concatenated into one
document, to be among the best long-context training data. No hub dataset ships them as text,
so this script builds them from repositories you have on disk (git clones, a Stack download
unpacked by repository):

  python data/make_code_repos.py CLONES_DIR data/code-repos     # one JSON line per repository

Each repository's text files (by extension, sorted by path) are joined, each headed by its path;
binary, vendored and generated folders are skipped. Then name the folder in a recipe:

  sources:
    - {source: data/code-repos, weight: 0.3, min_doc_tokens: 65536}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXTENSIONS = {
    ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".rs", ".go", ".java", ".kt", ".scala", ".js", ".ts",
    ".tsx", ".rb", ".php", ".cs", ".swift", ".m", ".jl", ".r", ".sh", ".lua", ".hs", ".ml", ".md", ".rst",
}  # fmt: skip
SKIP = {".git", "node_modules", "vendor", "third_party", "build", "dist", "__pycache__", ".venv"}


def repository_text(root: Path, max_file_bytes: int = 1 << 20) -> str:
    """The repository's text files joined, each after a "# path" line, in path order."""
    parts = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS):
        rel = path.relative_to(root)
        if SKIP & set(rel.parts[:-1]) or path.stat().st_size > max_file_bytes:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # not text after all
        parts.append(f"# {rel.as_posix()}\n{text.rstrip()}\n")
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clones", type=Path, help="a folder whose subfolders are repositories")
    parser.add_argument("out", type=Path, help="the output folder (written: repos.jsonl)")
    args = parser.parse_args(argv)
    if not args.clones.is_dir():
        print(f"make_code_repos: {args.clones} is not a folder of repositories", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(args.out / "repos.jsonl", "w") as f:
        for repo in sorted(p for p in args.clones.iterdir() if p.is_dir()):
            text = repository_text(repo)
            if text:
                f.write(json.dumps({"text": text, "repo": repo.name}) + "\n")
                written += 1
    if not written:
        print(f"make_code_repos: no repository under {args.clones} has text files", file=sys.stderr)
        return 2
    print(f"make_code_repos: {written} repositories -> {args.out / 'repos.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
