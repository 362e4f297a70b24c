"""The contract of an evaluation task (perplexity, passkey, RULER): one module owns its recipe keys
(eval.*), their checks, its `ringpatch eval` flags, its run on a model and its report.
spec.EVAL_TASKS lists them; EvalSpec and the command loop over it."""

from __future__ import annotations

from pathlib import Path

from ringpatch.schema import Key


class EvalTask:
    name: str
    keys: tuple[Key, ...] = ()
    """Its keys of the recipe's eval section."""

    def check_spec(self, spec) -> None:
        """Its values, against each other (ValueError naming eval.<key>, the values and the fix)."""

    def add_flags(self, parser) -> None:
        """Its flags of `ringpatch eval`."""

    def changes(self, args) -> dict:
        """The spec changes its flags ask for (flags win over the recipe)."""
        return {}

    def complete(self, spec, recipe, data_spec):
        """The spec with its empty defaults filled from the recipe (None: none) or the tasks
        before it in EVAL_TASKS."""
        return spec

    def enabled(self, spec, data_spec) -> bool:
        return bool(self.lengths(spec))

    def lengths(self, spec) -> tuple[int, ...]:
        """The prompt lengths it prefills (checked against the ring before any process group)."""
        return ()

    def prefills(self, spec, data_spec) -> list[tuple[int, int]]:
        """(length, rows) of each ring prefill its run makes at least, for the cost estimate and the
        progress bar (progress.py)."""
        return []

    def check_inputs(self, spec, data_spec, tokenizers: dict[str, object]) -> None:
        """Before any process group: what it reads ({model folder: its tokenizer}, data) can do the task."""

    def run(self, model, tokenizer, spec, data_spec, layout, device):
        """Its result for one ring-patched model (every rank of the group gets the same)."""
        raise NotImplementedError

    def report(self, results: dict, spec, out: Path) -> None:
        """Print its tables for {model label: result} and write out/<name>.{csv,json,png}."""
        raise NotImplementedError
