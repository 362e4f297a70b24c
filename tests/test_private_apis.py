"""The private names of other libraries that ringpatch still uses (docs/private-apis.md): each
still exists in the installed release. A failure names the library, its version and the name
that moved, so an upgrade that breaks one is found here, not in a user's run."""

from __future__ import annotations

import importlib.metadata
import inspect

import pytest

pytestmark = pytest.mark.unit


def _present(owner, name: str, library: str) -> None:
    assert hasattr(owner, name), (
        f"{library} {importlib.metadata.version(library)} has no {getattr(owner, '__name__', owner)}.{name}, which "
        "ringpatch uses (docs/private-apis.md): replace that use"
    )


def test_torch_distributed_internals():
    from torch.distributed import distributed_c10d as c10d

    for name in ("_world", "_rank_not_in_group", "_set_pg_timeout", "_get_default_store"):
        _present(c10d, name, "torch")
    _present(type(c10d._world), "pg_map", "torch")


def test_transformers_gradient_checkpointing_hook():
    from transformers import PreTrainedModel

    _present(PreTrainedModel, "_set_gradient_checkpointing", "transformers")
    assert "gradient_checkpointing_func" in inspect.signature(PreTrainedModel._set_gradient_checkpointing).parameters


def test_deepspeed_consolidated_state_dict():
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.engine import DeepSpeedEngine

    _present(DeepSpeedEngine, "_consolidated_16bit_state_dict", "deepspeed")


def test_accelerate_batch_sampler_shard_and_gradient_state():
    from accelerate import Accelerator
    from accelerate.data_loader import BatchSamplerShard
    from accelerate.state import GradientState

    for name in ("num_processes", "process_index", "even_batches"):
        assert name in inspect.signature(BatchSamplerShard.__init__).parameters, (
            f"accelerate {importlib.metadata.version('accelerate')}: BatchSamplerShard no longer takes {name}"
        )
    assert "self.gradient_state = " in inspect.getsource(Accelerator.__init__), (
        f"accelerate {importlib.metadata.version('accelerate')}: Accelerator no longer sets self.gradient_state"
    )
    for name in ("end_of_dataloader", "remainder"):
        _present(GradientState, name, "accelerate")


def test_trl_token_count_and_metrics():
    from trl import SFTTrainer

    source = inspect.getsource(SFTTrainer)
    for name in ("_total_train_tokens", "_metrics"):
        assert f"self.{name}" in source, (
            f"trl {importlib.metadata.version('trl')}: SFTTrainer no longer sets self.{name}, which ringpatch's "
            "RingSFTTrainer counts tokens through (docs/private-apis.md)"
        )
