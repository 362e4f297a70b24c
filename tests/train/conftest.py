"""Fixtures of the trainer tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def no_model_loads(monkeypatch):
    """A model or process group started before the input was refused fails the test."""
    import torch.distributed as dist
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    for name in ("from_pretrained", "from_config"):
        monkeypatch.setattr(transformers.AutoModelForCausalLM, name, refuse)
    monkeypatch.setattr(dist, "init_process_group", refuse)
