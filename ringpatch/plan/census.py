"""What autograd holds for backward, by decoder layer: the measurement behind the estimate's
activation items (ringpatch.plan.estimate; tests/plan/test_census.py, bench/memory.py)."""

from __future__ import annotations

import contextlib
from collections import Counter

import torch


@contextlib.contextmanager
def saved_bytes_by_layer(model: torch.nn.Module):
    """Within the block, count the bytes of every tensor autograd saves for backward, each storage
    once, parameters excluded, by the decoder layer running when it was saved (-1: outside the
    layers). Yields the Counter, filled as the forward runs. Works on the tensors' own storages,
    so it sees what is resident, views and shared tensors counted once."""
    layers = model.get_decoder().layers
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current = [-1]
    seen: set[int] = set()
    counts: Counter = Counter()

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen and storage.nbytes():
            seen.add(key)
            counts[current[0]] += storage.nbytes()
        return t

    def enter(index):
        return lambda *_: current.__setitem__(0, index)

    handles = [layer.register_forward_pre_hook(enter(i)) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(lambda *_: current.__setitem__(0, -1)) for layer in layers]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield counts
    finally:
        for h in handles:
            h.remove()
