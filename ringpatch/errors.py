"""The errors that are the user's to fix: a bad recipe, flag, path, model, data or launch.

Every command catches these before any process group and prints one line (exit 2); anything
else is a bug whose traceback is the report. The lowest layer, so every layer may name them.
"""

from __future__ import annotations

USER_ERRORS = (ValueError, TypeError, NotImplementedError, FileNotFoundError, FloatingPointError)
