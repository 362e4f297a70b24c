"""Test helpers, always imported as `from tests.helpers.<module> import ...` (ROOT from here):

procs.py      real multi-process groups (spawn, gloo, file store)
reference.py  plain float64 attention: the reference every ring result is held to
models.py     tiny Hugging Face models built from configs, and batches for them
trainrun.py   a tiny recipe, and launching the trainer under torchrun / deepspeed / accelerate
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository root (commands run from here)."""

HANG_S = 1800
"""The limit for a command a test starts: it only catches a hang. Outcomes never depend on speed,
and a loaded machine (`make test-stress`) may be many times slower than an idle one."""
