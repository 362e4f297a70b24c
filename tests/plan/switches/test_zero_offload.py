"""zero.offload, a registered switch in the recipe's zero section: DeepSpeed's (or FSDP2's) offload in
the engine's configuration, where the plan puts the model states, the remedy the memory check
names, and its refusals."""

from __future__ import annotations

import pytest

from ringpatch.plan.ds_config import deepspeed_config
from ringpatch.plan.estimate import model_states
from ringpatch.plan.items import Item
from ringpatch.plan.recipe import Recipe, from_dict
from ringpatch.plan.switches import SWITCHES, ZERO_OFFLOAD, remedy, state_flags

pytestmark = pytest.mark.unit

CFG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "vocab_size": 256}  # fmt: skip


def _recipe(stage: int = 3, offload: str = "none", **more) -> Recipe:
    return from_dict(
        Recipe,
        {"model": {"name": "meta-llama/Meta-Llama-3-8B"}, "parallel": {"sp": 4, "tp": 1},
         "zero": {"stage": stage, "offload": offload}, "stages": [{"seq_len": 65536, "steps": 1}], **more},
    )  # fmt: skip


def _states(recipe: Recipe, cuda: bool = True) -> dict[Item, float]:
    return model_states(recipe, CFG, 4, 2, cuda, state_flags(recipe, cuda))


@pytest.mark.parametrize(
    "offload, expected",
    [
        ("cpu", {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}),
        ("optimizer", {"stage": 3, "offload_optimizer": {"device": "cpu"}}),  # the parameters stay on the GPUs
        ("none", {"stage": 3}),
    ],
)
def test_zero_offload_moves_the_optimizer_and_with_cpu_the_parameters(offload, expected):
    """zero.offload in DeepSpeed's terms, and in the plan: with the optimizer on the host the GPU
    holds no optimizer state and no gradient partitions (DeepSpeed keeps them beside the
    optimizer); only `cpu` takes the ZeRO-3 parameter shards off the GPU."""
    recipe = _recipe(3, offload)
    assert ZERO_OFFLOAD in SWITCHES and ZERO_OFFLOAD.name == "zero.offload"
    assert deepspeed_config(recipe, bf16=True, cuda=True)["zero_optimization"] == expected
    assert deepspeed_config(recipe, bf16=True, cuda=True)["optimizer"]["params"]["torch_adam"] == (offload == "none")
    states = _states(recipe)
    assert (states[Item.WEIGHTS] == 0) == (offload == "cpu")
    assert (states[Item.GRADIENTS] == 0) == (states[Item.OPTIMIZER] == 0) == (offload != "none")
    # on a CPU run the host is the device: every state is counted, offloaded or not
    on_cpu = _states(recipe, cuda=False)
    assert all(v > 0 for v in on_cpu.values()) and on_cpu == _states(_recipe(3), cuda=False)


def test_the_plan_and_the_memory_check_follow_the_switch():
    """The stage's estimate takes the switch's state flags (no optimizer item with it on), the
    plan's first line names it, and the memory check offers it for the optimizer and the weights."""
    from ringpatch.plan.budget import estimate
    from ringpatch.plan.check import _remedy

    cfg = CFG | {"rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096}
    off, on = _recipe(2), _recipe(2, "optimizer")
    assert estimate(off, cfg, 4, 4096, 1)[Item.OPTIMIZER] > 0 == estimate(on, cfg, 4, 4096, 1)[Item.OPTIMIZER]
    assert remedy(off, Item.OPTIMIZER) == _remedy(off, Item.OPTIMIZER) == "zero.offload: optimizer"
    assert remedy(on, Item.OPTIMIZER) is None and _remedy(on, Item.OPTIMIZER) == "more ranks (parallel.sp)"
    assert _remedy(_recipe(3, "optimizer"), Item.WEIGHTS) == "zero.offload: cpu"
    assert _remedy(_recipe(1), Item.WEIGHTS) == "zero.stage: 3"
    assert _remedy(_recipe(0), Item.OPTIMIZER) == "zero.stage: 1"  # offload needs a partition to move
    fsdp2 = _recipe(3, engine="fsdp2")
    assert _remedy(fsdp2, Item.OPTIMIZER) == "zero.offload: cpu"  # FSDP2 has no optimizer-only offload


def test_zero_offload_needs_a_zero_stage_and_fsdp2_cannot_keep_the_parameters():
    from ringpatch.errors import Unsupported

    with pytest.raises(ValueError, match=r"zero.offload: optimizer needs zero.stage >= 1"):
        _recipe(0, "optimizer")
    with pytest.raises(Unsupported, match=r"engine: fsdp2 with zero.offload: optimizer"):
        _recipe(3, "optimizer", engine="fsdp2")
