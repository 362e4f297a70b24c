"""The planner's estimate in float32 (CPU training) against bf16 (GPU), item by item."""

from __future__ import annotations

import pytest

from ringpatch.memory.estimate import GIB, estimate, parameters
from ringpatch.train.recipe import Recipe, from_dict

pytestmark = pytest.mark.unit

CFG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=2, vocab_size=32000)  # fmt: skip


def test_float32_doubles_every_2_byte_tensor_and_drops_the_master_copy():
    recipe = from_dict(Recipe, {"model": {"name": "m"}, "parallel": {"sp": 2}, "zero": {"stage": 1},
                                "stages": [{"seq_len": 32768, "steps": 1}]})  # fmt: skip
    bf16 = estimate(recipe, CFG, 2, 32768, 1)
    fp32 = estimate(recipe, CFG, 2, 32768, 1, bf16=False)
    for item in ("weights", "gradients", "checkpointed activations", "recomputed layer"):
        assert fp32[item] == pytest.approx(2 * bf16[item]), item
    n, _ = parameters(CFG)
    assert bf16["optimizer"] == pytest.approx(12 * n / 2 / GIB) and fp32["optimizer"] == pytest.approx(8 * n / 2 / GIB)
    assert fp32["loss chunk"] == bf16["loss chunk"]  # float32 logits either way
    tokens, kv_dim = 16384, 64
    assert fp32["ring buffers"] == pytest.approx(tokens * kv_dim * (2 * 2 * 4 + 2 * 4) / GIB)
