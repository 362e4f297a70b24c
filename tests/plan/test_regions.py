"""Code regions (ringpatch/regions.py): the innermost one open names what a storage is filed under
in the simulated rank, per thread, and the step's code opens them where it allocates."""

from __future__ import annotations

import threading

import pytest
import torch

from ringpatch.regions import Region, current, region, within

pytestmark = pytest.mark.unit


def test_the_innermost_region_names_the_storage_and_closes_with_its_block():
    from ringpatch.plan.tracker import StorageTracker

    tracker = StorageTracker(lambda: ("device", str(current() or "outside")))
    kept = []
    with tracker:
        with region(Region.RING):
            kept.append(torch.empty(1024))
            with region(Region.KERNEL):
                kept.append(torch.empty(2048))
            kept.append(torch.empty(4096))
        kept.append(torch.empty(8192))
    assert tracker.by_category() == {"ring buffers": 4 * (1024 + 4096), "kernel outputs": 4 * 2048, "outside": 4 * 8192}
    assert current() is None


def test_a_region_is_open_on_its_own_thread_only_and_through_an_exception():
    seen = []
    with region(Region.LOSS):
        worker = threading.Thread(target=lambda: seen.append(current()))
        worker.start()
        worker.join()
        assert current() is Region.LOSS
    assert seen == [None]

    @within(Region.ALL_TO_ALL)
    def fails():
        assert current() is Region.ALL_TO_ALL
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        fails()
    assert current() is None


def test_the_step_opens_the_regions_where_it_allocates(tmp_path, data, monkeypatch):
    """A simulated Ulysses 2 x ring 2 step with the chunked loss: the ring's buffers, the kernel
    calls' outputs, the all-to-all copies and the loss chunk each appear under their region."""
    from ringpatch.attention.kernels import TorchCPU
    from ringpatch.parallel import build_mesh
    from ringpatch.plan.budget import on_device
    from ringpatch.plan.model import lm_from_config
    from ringpatch.plan.preflight import preflight
    from ringpatch.plan.simulate import counted_step, fake_world, step_batch, step_model
    from ringpatch.plan.tracker import StorageTracker
    from tests.helpers.trainrun import recipe

    cfg = {"model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 352,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 8192}  # fmt: skip
    path = recipe(tmp_path, data, parallel__sp=4, parallel__ulysses=2, model__config=cfg, micro_batch=1,
                  stages=[{"seq_len": 2048, "steps": 1}], loss_chunk_tokens=256)  # fmt: skip
    plan = on_device(preflight(str(path), world=4), "cpu")
    seen, add = set(), StorageTracker._add

    def record(self, key, t):
        seen.add(current())
        add(self, key, t)

    monkeypatch.setattr(StorageTracker, "_add", record)
    with fake_world(4):
        mesh = build_mesh(plan.dims, "cpu")
        model = step_model(plan, lm_from_config(plan.model_config, False), mesh, backend=TorchCPU())
        counted_step(plan, model, step_batch(plan, mesh, 0))
    assert {Region.RING, Region.KERNEL, Region.ALL_TO_ALL, Region.LOSS} <= seen, seen
