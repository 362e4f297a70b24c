"""The recipe's eval section and the evaluation tasks it is made of.

EVAL_TASKS lists the tasks (each one module: its eval.* keys, checks, flags, run and report) in the
order their tables print; EvalSpec's keys are theirs plus the ring's token budget. Adding a task is
its module, its entry here and its test."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from ringpatch.evaluate.passkey import PASSKEY
from ringpatch.evaluate.perplexity import PERPLEXITY
from ringpatch.evaluate.ruler import RULER
from ringpatch.evaluate.task import EvalTask
from ringpatch.schema import POSITIVE, check_fields, with_keys

EVAL_TASKS: tuple[EvalTask, ...] = (PERPLEXITY, PASSKEY, RULER)


@dataclass(frozen=True)
@with_keys([key for task in EVAL_TASKS for key in task.keys])
class EvalSpec:
    max_tokens_per_rank: Annotated[int, POSITIVE] = 262144
    """The most prompt tokens one rank holds during ring prefill; longer lengths are refused up front."""

    def __post_init__(self):  # also on dataclasses.replace, as `ringpatch eval`'s flags do
        check_fields(self, "eval")
        for task in EVAL_TASKS:
            task.check_spec(self)

    def lengths(self) -> list[int]:
        """Every prompt length of every task."""
        return [n for task in EVAL_TASKS for n in task.lengths(self)]
