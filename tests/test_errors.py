"""User errors are a project type: a command turns a UserError into one line and exit 2, and lets
any other error, a bug's ValueError or TypeError included, show its traceback. Each user error is
also the built-in it stands for, so callers catching ValueError keep working."""

from __future__ import annotations

import pytest

from ringpatch.errors import USER_ERRORS, BadType, BadValue, Diverged, Missing, Unsupported, UserError

pytestmark = pytest.mark.unit


def test_each_user_error_is_the_built_in_it_stands_for():
    for error, builtin in ((BadValue, ValueError), (BadType, TypeError), (Unsupported, NotImplementedError),
                           (Missing, FileNotFoundError), (Diverged, FloatingPointError)):  # fmt: skip
        assert issubclass(error, UserError) and issubclass(error, builtin)
    assert USER_ERRORS == (UserError,)
    assert not isinstance(ValueError("a bug"), USER_ERRORS)


@pytest.mark.parametrize(
    ("raised", "refused"),
    [
        (BadValue("seq_len must be > 0, got 0"), True),
        (ValueError("a bug"), False),
        (TypeError("a bug"), False),
    ],  # fmt: skip
)
def test_the_train_command_refuses_a_user_error_and_shows_a_bug(raised, refused, monkeypatch, capsys, tmp_path):
    from ringpatch.train import command

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(command, "preflight", fail)
    argv = ["--recipe", str(tmp_path / "r.yaml")]
    if refused:
        assert command.main(argv) == 2
        assert capsys.readouterr().err.strip() == f"ringpatch train: {raised}"
    else:
        with pytest.raises(type(raised), match="a bug"):
            command.main(argv)
