"""Long-context evaluation with ring prefill (`ringpatch eval`, `python -m ringpatch.evaluate`).

  prefill.py     score chosen positions of prompts split over a ring (forward only)
  perplexity.py  perplexity vs context length
  passkey.py     passkey retrieval prompts and accuracy
  ruler.py       RULER-style tasks (retrieval, tracing, aggregation) and the effective length
  report.py      tables, CSV/JSON rows, plots
  command.py     the command: models side by side from a recipe's run or from flags

Reads recipes (ringpatch.train.recipe) for its command; nothing in ringpatch imports it.
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
