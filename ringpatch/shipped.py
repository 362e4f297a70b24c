"""The files a recipe run needs beside the package: the recipes, the launch configs (accelerate,
DeepSpeed, SLURM) and the demo's base model. A checkout has them at its root; a built wheel carries
them as ringpatch/_shipped/ (setup.py); `ringpatch init DIR` writes them out with the demo corpus.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ringpatch.errors import BadValue, Missing

FOLDERS = ("recipes", "launch", "data/demo-base")
"""What is shipped, as folders relative to the repository root (and inside ringpatch/_shipped/)."""


def shipped_root() -> Path:
    """The folder that holds FOLDERS: the wheel's ringpatch/_shipped/, or the checkout's root when
    ringpatch is imported from one (an editable install)."""
    package = Path(__file__).resolve().parent
    for root in (package / "_shipped", package.parent):
        if all((root / folder).is_dir() for folder in FOLDERS):
            return root
    raise Missing(
        f"this installation of ringpatch ({package}) carries no recipes or launch configs: install it from a "
        "wheel or sdist built by `python -m build`, or use a checkout of the repository"
    )


def write_out(dest: str | Path, force: bool = False) -> list[Path]:
    """Copy FOLDERS into `dest` (created if missing) and return the files written; a file already
    there is BadValue unless `force` (every clash named, nothing written)."""
    root, dest = shipped_root(), Path(dest).expanduser()
    pairs = [
        (src, dest / src.relative_to(root))
        for folder in FOLDERS
        for src in sorted((root / folder).rglob("*"))
        if src.is_file() and "__pycache__" not in src.parts
    ]
    clashes = [str(target) for _, target in pairs if target.exists()]
    if clashes and not force:
        shown = ", ".join(clashes[:5]) + (f" and {len(clashes) - 5} more" if len(clashes) > 5 else "")
        raise BadValue(
            f"{len(clashes)} files exist already ({shown}); choose another folder, or pass --force to overwrite"
        )
    for src, target in pairs:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    return [target for _, target in pairs]
