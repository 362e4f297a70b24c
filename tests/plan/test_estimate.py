"""The planner's items: model states by ZeRO stage and precision, what is held through a step, and
the peak as the held items plus the largest backward. The phases' counts are held to the simulated
rank in tests/plan/test_simulate.py."""

from __future__ import annotations

import dataclasses

import pytest

from ringpatch.hf.counts import parameters
from ringpatch.plan.budget import estimate
from ringpatch.plan.estimate import GIB, layer_saved_bytes, total_gib
from ringpatch.plan.items import Item
from ringpatch.plan.recipe import Recipe, from_dict

pytestmark = pytest.mark.unit

CFG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=2, vocab_size=32000)  # fmt: skip


def _recipe(**changes) -> Recipe:
    spec = {"model": {"name": "m"}, "parallel": {"sp": 2}, "stages": [{"seq_len": 32768, "steps": 1}], **changes}
    return from_dict(Recipe, spec)


def test_float32_doubles_the_2_byte_tensors_and_drops_the_master_copy():
    recipe = _recipe(zero={"stage": 1})
    bf16 = estimate(recipe, CFG, 2, 32768, 1)
    fp32 = estimate(recipe, CFG, 2, 32768, 1, bf16=False)
    for item in (Item.WEIGHTS, Item.GRADIENTS, Item.CHECKPOINTED):
        assert fp32[item] == pytest.approx(2 * bf16[item]), item
    n, _ = parameters(CFG)
    optimizer = Item.OPTIMIZER
    assert bf16[optimizer] == pytest.approx(12 * n / 2 / GIB) and fp32[optimizer] == pytest.approx(8 * n / 2 / GIB)
    # RMSNorm's float32 copy: none in float32, so its backward holds 5 temporaries + its own input
    tokens, h = 16384, 256
    assert fp32[Item.FINAL_NORM_BACKWARD] * GIB == pytest.approx(tokens * (6 * 4 * h + 4 * h))
    assert bf16[Item.FINAL_NORM_BACKWARD] * GIB == pytest.approx(tokens * (6 * 4 * h + 2 * h))


def test_the_peak_holds_the_largest_backward_not_their_sum():
    items = {Item.WEIGHTS: 1.0, Item.CHECKPOINTED: 2.0, Item.MLP_BACKWARD: 3.5, Item.LOSS_CHUNK: 1.5,
             Item.FINAL_NORM_BACKWARD: 0.5, Item.LAYER_GATHERED: 0.25, Item.LOSS_GATHERED: 1.0}  # fmt: skip
    assert total_gib(items) == 1.0 + 2.0 + 3.5 + 0.25
    assert total_gib({**items, Item.LOSS_CHUNK: 5.0}) == 1.0 + 2.0 + 5.0 + 1.0  # the LM head is gathered for the loss
    # a CPU's gradient buffers fill in the layers' backward, after the loss chunk's
    cpu = {**items, Item.GRADIENTS_AS_MADE: 0.5, Item.ZERO_BUCKETS_AS_FILLED: 0.5, Item.LOSS_CHUNK: 5.0}
    assert total_gib(cpu) == 1.0 + 2.0 + 5.0 + 1.0
    assert total_gib({**cpu, Item.LOSS_CHUNK: 1.5}) == 1.0 + 2.0 + 3.5 + 0.25 + 0.5 + 0.5


def test_checkpointing_keeps_one_input_per_layer_instead_of_everything_each_layer_saves():
    on = _recipe()
    off = dataclasses.replace(on, activation_checkpointing=False)
    offload = dataclasses.replace(on, activation_offload=True)
    tokens, b, h = 16384, 2, CFG["hidden_size"]
    rope = tokens * 2 * 32 * b
    est_on, est_off = estimate(on, CFG, 2, 32768, 1), estimate(off, CFG, 2, 32768, 1)
    assert est_on[Item.CHECKPOINTED] * GIB == pytest.approx(4 * tokens * h * b + rope)
    per_layer = layer_saved_bytes(CFG, 1, b)
    assert est_off[Item.CHECKPOINTED] * GIB == pytest.approx(4 * tokens * per_layer + rope)
    assert estimate(offload, CFG, 2, 32768, 1)[Item.CHECKPOINTED] * GIB == pytest.approx(rope)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_the_flops_formula_against_torchs_own_count(name):
    """forward_flops (and so step_flops and MFU) against torch's FlopCounterMode on a real forward and
    backward of the unpatched model: eager attention multiplies the whole square (the mask is added
    after), so the counter's forward is the formula plus the causal half the formula leaves out,
    2 x S^2 x heads x head_dim per layer; the backward is twice the forward (each matmul's two
    gradients), so a step is 3x, as step_flops counts."""
    from torch.utils.flop_counter import FlopCounterMode

    from ringpatch.hf.counts import attention_shape, forward_flops
    from tests.helpers.models import batch, build

    model = build(name)
    cfg, seq = model.config.to_dict(), 48
    full = batch(rows=1, seq=seq)
    with FlopCounterMode(display=False) as forward:
        loss = model(**full).loss
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    heads, _, d = attention_shape(cfg)
    skipped = cfg["num_hidden_layers"] * 2 * seq * seq * heads * d
    assert forward.get_total_flops() == forward_flops(cfg, seq) + skipped
    assert backward.get_total_flops() == 2 * forward.get_total_flops()
