"""Long-context evaluation with ring prefill (`ringpatch eval`, `python -m ringpatch.evaluate`).

  prefill.py     score chosen positions of prompts split over a ring (forward only)
  task.py        the contract of a task: its eval.* keys, checks, flags, run and report
  perplexity.py  perplexity vs context length (task PERPLEXITY)
  passkey.py     passkey retrieval prompts and accuracy (task PASSKEY)
  ruler.py       RULER-style tasks and the effective length (task RULER)
  spec.py        EVAL_TASKS and EvalSpec, the recipe's eval section, made of the tasks' keys
  heldout.py     held-out packed sequences; report.py: tables, CSV/JSON rows, list checks
  command.py     the command: models side by side from a recipe's run or from flags

Below train (the recipe holds EvalSpec); only its command reads recipes.
"""

from ringpatch.evaluate.passkey import CLASSIC, PasskeyTemplate, demo_template, passkey_accuracy, passkey_prompt
from ringpatch.evaluate.perplexity import perplexity_by_length
from ringpatch.evaluate.prefill import check_lengths, ring_prefill_scores
from ringpatch.evaluate.ruler import TASKS, effective_length, ruler_scores

__all__ = [
    "ring_prefill_scores",
    "check_lengths",
    "perplexity_by_length",
    "passkey_accuracy",
    "passkey_prompt",
    "PasskeyTemplate",
    "CLASSIC",
    "demo_template",
    "ruler_scores",
    "effective_length",
    "TASKS",
]
