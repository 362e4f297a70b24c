"""The package's import rule: each layer imports only the layers listed before it, and
ringpatch.attention (and the public API) runs without transformers or deepspeed."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.helpers import HANG_S, ROOT

pytestmark = pytest.mark.unit

PACKAGE = ROOT / "ringpatch"
# Lowest first: a module may import its own layer and those before it, never one after it.
LAYERS = (
    "errors",
    "flags",
    "regions",
    "schema",
    "shipped",
    "attention",
    "parallel",
    "hf",
    "memory",
    "integrations",
    "data",
    "evaluate",
    "plan",
    "train",
)
PUBLIC_API = "memory"  # `import ringpatch` loads attention, hf and memory: it ranks with memory
COMMANDS = ("cli", "selfcheck")  # top-level commands: may import every layer
ENTRY_POINTS = ("command", "__main__")  # a layer's own command (`python -m ringpatch.evaluate`): may too
# Third-party packages a layer must not import, even inside a function.
FORBIDDEN = {
    "regions": ("torch", "transformers", "deepspeed", "accelerate", "datasets", "wandb"),
    "schema": ("torch", "transformers", "deepspeed", "accelerate", "datasets", "wandb"),
    "shipped": ("torch", "transformers", "deepspeed", "accelerate", "datasets", "wandb"),
    "attention": ("transformers", "deepspeed", "accelerate", "datasets", "wandb"),
    "parallel": ("transformers", "deepspeed", "accelerate", "datasets", "wandb"),
    "hf": ("deepspeed", "datasets", "wandb"),
    "memory": ("deepspeed", "datasets", "wandb"),
    "evaluate": ("deepspeed", "accelerate", "wandb"),
}


def _layer_of_module(parts: tuple[str, ...]) -> str | None:
    """The layer a dotted ringpatch module name (without 'ringpatch') belongs to."""
    if not parts or parts[0] == "__init__":
        return PUBLIC_API
    return parts[0] if parts[0] in LAYERS else None


def _imports(path):
    """(line, dotted name) of every import in the file, function-local ones included."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: use absolute imports (from ringpatch.<layer> ...)"
            yield node.lineno, node.module
            if node.module == "ringpatch":  # `from ringpatch import train` names a subpackage
                yield from ((node.lineno, f"ringpatch.{alias.name}") for alias in node.names)


def _violations():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("").parts
        if rel[0] in COMMANDS or rel[-1] in ENTRY_POINTS:
            continue
        layer = _layer_of_module(rel)
        assert layer is not None, f"ringpatch/{'/'.join(rel)}.py sits in no layer; add it to LAYERS or COMMANDS"
        for line, name in _imports(path):
            parts = name.split(".")
            where = f"ringpatch/{'/'.join(rel)}.py:{line}"
            if parts[0] in FORBIDDEN.get(layer, ()):
                found.append(f"{where} ({layer}) imports {name}")
            if parts[0] != "ringpatch":
                continue
            target = _layer_of_module(tuple(parts[1:]))
            if target in COMMANDS or (target is not None and LAYERS.index(target) > LAYERS.index(layer)):
                found.append(f"{where} ({layer}) imports {name} ({target}), a layer above it")
    return found


def test_every_layer_imports_only_the_layers_below_it():
    assert _violations() == []


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: an attention module that imports the trainer, or transformers, is reported."""
    fake = tmp_path / "ringpatch"
    (fake / "attention").mkdir(parents=True)
    (fake / "attention" / "bad.py").write_text(
        "def f():\n    from ringpatch.train import loop\n    import transformers\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _violations() == [
        "ringpatch/attention/bad.py:2 (attention) imports ringpatch.train (train), a layer above it",
        "ringpatch/attention/bad.py:3 (attention) imports transformers",
    ]


@pytest.mark.parametrize("module", ["ringpatch.attention", "ringpatch", "ringpatch.parallel"])
def test_importing_loads_no_transformers_or_deepspeed(module):
    code = (
        f"import sys, {module}\n"
        "heavy = sorted({'transformers', 'deepspeed', 'accelerate', 'datasets', 'wandb'} & set(sys.modules))\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, f"import {module} loaded {proc.stdout.strip()}{proc.stderr[-2000:]}"
