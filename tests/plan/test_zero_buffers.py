"""DeepSpeed's ZeRO buffers, read from a DeepSpeed engine, against the plan's (reserve.zero_buffers).

One process (world 1, gloo, DeepSpeed on the CPU accelerator), the trainer's own config
(ds_config.deepspeed_config with an overlay of bucket sizes small enough for a tiny Llama), read by
plan/zero_readout.py: the gradient buckets DeepSpeed holds through the backward must equal the
plan's bytes for a GPU run (where they are allocated whole); the weights ZeRO-3 holds gathered,
after every fetch of a step, by phase of the backward (the LM head's forward and backward, the final
norm's, the layers' with their recompute, the embedding's), and the plan's replay of DeepSpeed's
coordinator (reserve.zero3_gathered) must hold each and stay within 1% of it: over reuse
distances and live-parameter limits that keep the whole model, a layer, or less, with tied
embeddings and without activation checkpointing; with tiled MLPs (DeepSpeed's TiledMLP, whose
repeated calls the replay does not trace) it holds every phase, exactly but for the final norm's."""

from __future__ import annotations

import os

import pytest
import torch

from ringpatch.plan.ds_config import deepspeed_config
from ringpatch.plan.recipe import Recipe, from_dict
from ringpatch.plan.reserve import zero_buffers
from ringpatch.plan.switches.mlp_tiles import tile_mlps
from ringpatch.plan.zero_readout import ZeroReadout
from tests.helpers.procs import spawn

pytestmark = pytest.mark.multiprocess

CFG = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, tie_word_embeddings=False, model_type="llama")  # fmt: skip
LAYER = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 160  # a decoder layer's weights (norms aside)
BUCKETS = {"reduce_bucket_size": 5000, "overlap_comm": True, "contiguous_gradients": True}
GATHERING = [  # (stage3_max_reuse_distance, stage3_max_live_parameters, tied embeddings, checkpointing)
    (1e9, 20000, False, True),  # every weight reused within the distance: the whole model stays gathered
    (0, 20000, False, True),  # released after each use: a layer (its recompute keeps it) and what is in flight
    (20000, 1e9, False, True),  # prefetching fills up to the live limit, here the model
    (50000, 100000, False, True),
    (15000, 60000, False, True),  # the shipped zero3.json on Llama-3-8B scaled down: reuse 1/8, live 1.4 layers
    (15000, 60000, True, True),
    (15000, 60000, False, False),
    (0, 20000, True, False),
]


def _config(stage: int, reuse: float = 1e9, live: float = 1e9) -> dict:
    recipe = from_dict(
        Recipe,
        {
            "model": {"name": "tiny"},
            "stages": [{"seq_len": 64, "steps": 1}],
            "zero": {"stage": stage, "offload": "none"},
        },
    )
    knobs = dict(BUCKETS)
    if stage == 3:
        knobs |= {"stage3_prefetch_bucket_size": 2000, "stage3_param_persistence_threshold": 0,
                  "stage3_max_reuse_distance": reuse, "stage3_max_live_parameters": live}  # fmt: skip
    return deepspeed_config(recipe, bf16=True, overlay={"zero_optimization": knobs})


def _measure(rank, world_size, stage, reuse, live, tied=False, checkpointing=True, tiles=1):
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")
    import deepspeed
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = CFG | {"tie_word_embeddings": tied}
    lm = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    if checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tile_mlps(lm, tiles)
    config = _config(stage, reuse, live)
    engine, *_ = deepspeed.initialize(model=lm, model_parameters=lm.parameters(), config=config)
    readout = ZeroReadout(engine, lm)
    for _ in range(3):  # the first step records DeepSpeed's trace; the later ones follow it
        readout.step_begin()
        ids = torch.randint(0, CFG["vocab_size"], (1, 64))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    buckets, gathered = readout.buckets, readout.gathered
    del engine, readout
    plan = zero_buffers(config, cfg, 2, cuda=True, checkpointing=checkpointing)
    phases = ", ".join(f"{k} {v * 2} ({plan[k]:.0f})" for k, v in gathered.items()) if stage == 3 else "-"
    print(
        f"stage {stage} reuse {reuse:g} live {live:g} tied {tied} checkpointing {checkpointing}: buckets "
        f"{sorted(set(buckets))} bytes (planned {plan['held']:.0f}); gathered bytes (planned): {phases}"
    )
    # stage 3: one bucket per communication dtype; stage 2: a second while overlap_comm
    assert buckets and set(buckets) == {plan["held"]}, (buckets, plan["held"])
    assert plan["held"] == BUCKETS["reduce_bucket_size"] * 2 * (2 if stage == 2 else 1)
    if stage == 3:
        for phase, measured in gathered.items():
            assert measured > 0 and measured * 2 <= plan[phase], (phase, measured * 2, plan)
            # tiled MLPs prefetch less by the final norm (the trace has one MLP call per layer): there the plan bounds it
            if tiles == 1 or phase != "final_norm":
                assert plan[phase] <= 1.01 * measured * 2, (phase, measured * 2, plan)


def test_the_plan_holds_deepspeed_zero2_buckets_as_the_engine_allocates_them():
    spawn(_measure, 1, 2, 0, 0)


@pytest.mark.parametrize("reuse, live, tied, checkpointing", GATHERING)
def test_the_plan_holds_deepspeed_zero3_buffers_as_the_engine_allocates_them(reuse, live, tied, checkpointing):
    spawn(_measure, 1, 3, reuse, live, tied, checkpointing)


@pytest.mark.parametrize("reuse, live", [(15000, 60000), (0, 20000), (1e9, 20000)])
def test_the_plan_holds_zero3_gathered_weights_with_tiled_mlps(reuse, live):
    spawn(_measure, 1, 3, reuse, live, False, True, 4)
