"""The commands' optional dependencies: `pip install ringpatch` is the library (torch and
transformers: patch_model, shard_batch, ring_attention); the recipe trainer, data preparation
and evaluation need the `train` extra. Checked before anything heavy is imported, so a missing
package is one line that names the install command, not an ImportError deep in a launcher."""

from __future__ import annotations

import importlib.util
import sys

# what each command imports, by import name -> the distribution pip installs
TRAIN = {"deepspeed": "deepspeed", "accelerate": "accelerate", "datasets": "datasets", "yaml": "pyyaml"}
NEEDS = {
    # the run's report needs matplotlib; DeepSpeed only where the recipe uses it (check_engine)
    "train": {**{k: v for k, v in TRAIN.items() if k != "deepspeed"}, "matplotlib": "matplotlib"},
    "prepare": {"datasets": "datasets", "yaml": "pyyaml"},
    "eval": {**TRAIN, "matplotlib": "matplotlib"},
    "plan": {"yaml": "pyyaml"},
    "selfcheck": {},
    "corpus": {},
    "init": {},
    "recipe": {"yaml": "pyyaml"},
    "report": {"matplotlib": "matplotlib"},
}


def missing(command: str) -> list[str]:
    """The distributions `command` needs that are not installed."""
    return [dist for module, dist in NEEDS[command].items() if importlib.util.find_spec(module) is None]


def require(command: str) -> None:
    """Stop the process (exit 2, one line) when `command` cannot run: for `python -m` entry points."""
    problem = check(command)
    if problem:
        print(problem, file=sys.stderr)
        raise SystemExit(2)


def check(command: str) -> str | None:
    """None when `command` can run, else the message that says what to install."""
    gone = missing(command)
    if not gone:
        return None
    return (
        f"ringpatch {command} needs {', '.join(gone)}, which {'is' if len(gone) == 1 else 'are'} not installed: "
        "install the training extra with  pip install 'ringpatch[train]'  (the library alone, "
        "`pip install ringpatch`, is patch_model, shard_batch and ring_attention)"
    )


def check_engine(recipe) -> None:
    """Missing, naming the ways out, when the recipe's engine is DeepSpeed and it is not installed;
    engine: fsdp2 runs without it (its tiled MLP too: switches/mlp_tiles.py)."""
    if importlib.util.find_spec("deepspeed") is not None or recipe.engine != "deepspeed":
        return
    from ringpatch.errors import Missing

    raise Missing(
        "engine: deepspeed (the default) needs DeepSpeed, which is not installed: pip install deepspeed (it comes "
        "with 'ringpatch[train]'), or set engine: fsdp2 (torch's FSDP2, with zero.stage: 3)"
    )
