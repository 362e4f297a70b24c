"""`make package-check`: build the wheel and the sdist, install each into a clean venv with
torch and nothing else of ours, and check what a library-only user gets:

- none of the training extra's packages is installed (deepspeed, accelerate, datasets, wandb,
  matplotlib), yet `import ringpatch` works;
- examples/train_plain.py (patch_model + shard_batch + DDP) on 2 gloo processes gives the losses
  of one process to 1e-5;
- `ringpatch train` stops with the line that names `pip install 'ringpatch[train]'`;
- `ringpatch init` writes the shipped recipes, launch configs and demo base out of the installed package.

Needs the package registry (transformers and its dependencies); takes a few minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN_ONLY = ("deepspeed", "accelerate", "datasets", "wandb", "matplotlib")


def run(cmd, check_rc: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if check_rc and proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def check(artifact: Path, torch_pin: str, work: Path) -> None:
    started = time.time()
    venv = work / f"venv-{artifact.suffix.strip('.') or 'sdist'}"
    run([sys.executable, "-m", "venv", venv])
    bin_ = venv / "bin"
    run([bin_ / "pip", "install", "-q", torch_pin, artifact])
    found = run([bin_ / "python", "-c", "import importlib.util as u; print(' '.join(m for m in "
                 f"{TRAIN_ONLY!r} if u.find_spec(m)))"]).stdout.split()  # fmt: skip
    assert not found, f"{artifact.name} installed the training extra's {found}"
    # the installed package, not the checkout: run from elsewhere, with the example's own folder on sys.path
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    losses = {}
    for nproc in (1, 2):
        out = work / f"losses-{nproc}.txt"
        run([bin_ / "torchrun", "--standalone", f"--nproc_per_node={nproc}", ROOT / "examples" / "train_plain.py",
             "--steps", "3", "--seq-len", "256", "--losses", out], cwd=work, env=env)  # fmt: skip
        losses[nproc] = [float(x) for x in out.read_text().split()]
    where = run([bin_ / "python", "-c", "import ringpatch; print(ringpatch.__file__)"], cwd=work, env=env).stdout
    assert str(venv) in where, f"imported {where.strip()}, not the installed package"
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses[2], losses[1], strict=True))
    assert worst <= 1e-5, (losses, worst)
    proc = run([bin_ / "ringpatch", "train", "--recipe", ROOT / "recipes" / "tiny-cpu.yaml"], cwd=work, env=env,
               check_rc=False)  # fmt: skip
    assert proc.returncode == 2 and "pip install 'ringpatch[train]'" in proc.stderr, proc.stderr
    start = work / f"start-{venv.name}"
    run([bin_ / "ringpatch", "init", start], cwd=work, env=env)
    shipped = sorted(str(p.relative_to(start)) for p in start.rglob("*") if p.is_file())
    for want in ("recipes/llama3-8b-1m-1node.yaml", "launch/deepspeed/zero3.json", "data/demo-base/model.safetensors"):
        assert want in shipped, (want, shipped)
    print(
        f"{artifact.name}: installs without {', '.join(TRAIN_ONLY)}; train_plain.py 2 ranks vs 1: losses "
        f"{' '.join(f'{x:.6f}' for x in losses[2])}, worst relative difference {worst:.1e}; `ringpatch init` wrote "
        f"{len(shipped)} files; "
        f"({time.time() - started:.0f} s)\n  `ringpatch train` said: {proc.stderr.strip().splitlines()[-1]}"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--torch", default="torch==2.13.0", help="the torch requirement of the clean venvs")
    a = p.parse_args()
    dist = ROOT / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", dist, ROOT], cwd=ROOT)
    artifacts = sorted(dist.glob("ringpatch-*.whl")) + sorted(dist.glob("ringpatch-*.tar.gz"))
    assert len(artifacts) == 2, artifacts
    with tempfile.TemporaryDirectory() as tmp:
        for artifact in artifacts:
            check(artifact, a.torch, Path(tmp))
    print("package check passed")


if __name__ == "__main__":
    main()
