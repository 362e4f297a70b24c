"""The planner's estimate in float32 (CPU training) against bf16 (GPU), item by item."""

from __future__ import annotations

import dataclasses

import pytest

from ringpatch.memory.estimate import GIB, estimate, layer_saved_bytes, parameters, total_gib
from ringpatch.train.recipe import Recipe, from_dict

pytestmark = pytest.mark.unit

CFG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=2, vocab_size=32000)  # fmt: skip


def test_float32_doubles_the_2_byte_tensors_and_drops_the_master_copy():
    recipe = from_dict(Recipe, {"model": {"name": "m"}, "parallel": {"sp": 2}, "zero": {"stage": 1},
                                "stages": [{"seq_len": 32768, "steps": 1}]})  # fmt: skip
    bf16 = estimate(recipe, CFG, 2, 32768, 1)
    fp32 = estimate(recipe, CFG, 2, 32768, 1, bf16=False)
    for item in ("weights", "gradients", "checkpointed activations"):
        assert fp32[item] == pytest.approx(2 * bf16[item]), item
    # RMSNorm upcasts to float32 in either precision: 12 bytes a hidden unit against 8
    assert fp32["final norm"] == pytest.approx(1.5 * bf16["final norm"])
    assert 1.5 * bf16["recomputed layer"] < fp32["recomputed layer"] < 2 * bf16["recomputed layer"]
    n, _ = parameters(CFG)
    assert bf16["optimizer"] == pytest.approx(12 * n / 2 / GIB) and fp32["optimizer"] == pytest.approx(8 * n / 2 / GIB)
    assert fp32["loss chunk"] == bf16["loss chunk"] == pytest.approx(3 * 4096 * 32000 * 4 / GIB)  # float32 logits
    tokens, kv_dim = 16384, 64
    assert fp32["ring buffers"] == pytest.approx(tokens * kv_dim * (2 * 2 * 4 + 2 * 4) / GIB)


def test_the_peak_holds_the_loss_backward_or_a_layer_backward_not_both():
    items = {"weights": 1.0, "checkpointed activations": 2.0, "recomputed layer": 3.0, "ring buffers": 0.5,
             "loss chunk": 1.5, "final norm": 0.5}  # fmt: skip
    assert total_gib(items) == 1.0 + 2.0 + 3.5
    assert total_gib({**items, "loss chunk": 5.0}) == 1.0 + 2.0 + 5.5


def test_checkpointing_keeps_one_input_per_layer_instead_of_everything_each_layer_saves():
    on = from_dict(Recipe, {"model": {"name": "m"}, "parallel": {"sp": 2}, "stages": [{"seq_len": 32768, "steps": 1}]})
    off = dataclasses.replace(on, activation_checkpointing=False)
    tokens, b, h = 16384, 2, CFG["hidden_size"]
    rope = tokens * 2 * 32 * b
    est_on, est_off = estimate(on, CFG, 2, 32768, 1), estimate(off, CFG, 2, 32768, 1)
    assert est_on["checkpointed activations"] * GIB == pytest.approx(4 * tokens * h * b + rope)
    per_layer = layer_saved_bytes(CFG, 1, b)
    assert est_off["checkpointed activations"] * GIB == pytest.approx(4 * tokens * per_layer + rope)
    assert est_on["final norm"] == est_off["final norm"] == pytest.approx(tokens * 8 * h / GIB)
    # the recompute holds one layer's saved tensors on top of the gradients both have
    assert (est_on["recomputed layer"] - est_off["recomputed layer"]) * GIB == pytest.approx(tokens * per_layer)
