"""Fixtures of the trainer tests."""

from __future__ import annotations

import pytest

from tests.helpers.trainrun import corpus


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The generated corpus (train and held-out jsonl), one per test module."""
    return corpus(tmp_path_factory.mktemp("corpus"))
