"""The errors that are the user's to fix: a bad recipe, flag, path, model, data or launch.

Every command catches UserError before any process group and prints one line (exit 2); anything
else, a ValueError or TypeError from a bug included, is a bug whose traceback is the report. Each
type is also the built-in error it stands for (BadValue is a ValueError), so code and tests that
catch the built-in keep working. The lowest layer, so every layer may name them.
"""

from __future__ import annotations


class UserError(Exception):
    """The user's to fix; its message says what was wrong, with the values, and how to fix it."""


class BadValue(UserError, ValueError):
    """A value the user gave (recipe, flag, argument, file contents) that cannot be used."""


class BadType(UserError, TypeError):
    """A value of the wrong type."""


class Unsupported(UserError, NotImplementedError):
    """A model, feature or combination ringpatch does not run."""


class Missing(UserError, FileNotFoundError):
    """A path the user named that does not exist."""


class Diverged(UserError, FloatingPointError):
    """Training went non-finite (the learning rate, the data or the precision are the user's)."""


USER_ERRORS = (UserError,)
