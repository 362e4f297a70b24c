"""The planner against measured peaks: the bench's Llama-shaped model (hidden 256, 4 layers,
vocab 32000) trained one step on 2 gloo ranks, in fresh processes, with the memory switches of
three recipes. Each rank's resident peak above its idle size, and the peak of its live tensors,
are within 20% of the estimate (bench/memory.py runs the full grid)."""

from __future__ import annotations

import pytest

from bench.memory import bench_config, measure, predicted_gib
from ringpatch.plan.estimate import total_gib

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("name", ["chunked", "on"])
def test_estimate_within_20_percent_of_the_measured_peak(name):
    seq, loss_chunk = 4096, 1024
    row = measure(name, seq, world=2, loss_chunk=loss_chunk)
    predicted = total_gib(predicted_gib(name, seq, 2, bench_config(), loss_chunk))
    assert 0.8 <= predicted / row["step_gib"] <= 1.2, (name, predicted, row)
    if row["live_gib"] is not None:
        assert 0.8 <= predicted / row["live_gib"] <= 1.2, (name, predicted, row)
