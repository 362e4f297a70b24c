"""FSDP2's buffers in a decoder layer's backward, read from its parameter groups
(plan/fsdp2_readout.py) on 2 gloo ranks with the trainer's own engine (train/fsdp2.py: bf16
compute, float32 master shards and reduction), against the plan's (reserve.fsdp2_buffers)."""

from __future__ import annotations

import pytest
import torch

from ringpatch.plan.fsdp2_readout import Fsdp2Readout
from ringpatch.plan.items import Item
from ringpatch.plan.recipe import Recipe, from_dict
from ringpatch.plan.reserve import fsdp2_buffers
from tests.helpers.procs import spawn

pytestmark = pytest.mark.multiprocess

CFG = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip


def _measure(rank, world_size, found_path):
    import json

    from transformers import AutoModelForCausalLM, LlamaConfig

    from ringpatch.train.fsdp2 import Fsdp2Engine, decoder_layers

    class Loss(torch.nn.Module):  # the loss model's shape (the engine shards .lm's layers), plain attention
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, **batch):
            return self.lm(**batch).loss

    recipe = from_dict(
        Recipe,
        {"model": {"name": "tiny"}, "stages": [{"seq_len": 64, "steps": 1}], "engine": "fsdp2", "zero": {"stage": 3}},
    )
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(LlamaConfig(**CFG))
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(lm)  # before fully_shard renames their classes
    engine = Fsdp2Engine(Loss(lm), recipe, True, torch.device("cpu"), lambda step: 1.0)
    readout = Fsdp2Readout(engine.module, layers, [layer.input_layernorm for layer in layers])
    for _ in range(2):
        ids = torch.randint(0, CFG["vocab_size"], (1, 64))
        engine.backward(engine(input_ids=ids, labels=ids))
        engine.step()
    if rank == 0:
        with open(found_path, "w") as f:
            json.dump({"peaks": readout.peaks, "samples": readout.samples}, f)


def test_the_plan_holds_what_fsdp2_holds_in_a_layers_backward(tmp_path):
    """After each decoder layer's backward: that layer's weights and the next one's (prefetched)
    gathered in bf16, its bf16 gradients and the previous layer's float32 reduce-scatter input
    (the plan's layer item, which leaves the layers' norms out: within 1%); the root's weights
    gathered and the LM head's gradient whole through every layer's backward (the plan's root items,
    held through the step)."""
    import json

    spawn(_measure, 2, str(tmp_path / "found.json"))
    found = json.loads((tmp_path / "found.json").read_text())
    peaks = found["peaks"]
    plan = fsdp2_buffers(dict(CFG, model_type="llama"), 2)
    layer_part = peaks["layers gathered"] + peaks["layer gradients"] + peaks["reduce-scatter inputs"]
    planned = {item.name: round(v) for item, v in plan.items()}
    print(f"read from FSDP2 (bytes): {peaks}; planned: {planned}")
    assert plan[Item.FSDP2_LAYER] <= layer_part <= 1.01 * plan[Item.FSDP2_LAYER]
    assert plan[Item.FSDP2_ROOT] <= peaks["root gathered"] <= 1.01 * plan[Item.FSDP2_ROOT]
    assert plan[Item.FSDP2_ROOT_GRADIENTS] <= peaks["root gradients"] <= 1.01 * plan[Item.FSDP2_ROOT_GRADIENTS]
    # the root's are there in every layer's backward, not in the loss's alone
    assert all(s["root gathered"] == peaks["root gathered"] and s["root gradients"] for s in found["samples"])
    assert len(found["samples"]) == 2 * CFG["num_hidden_layers"]
