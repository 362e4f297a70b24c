"""Each backward phase of the plan against a real run: at a shape where that phase sets the step's
peak (a layer's MLP, its norm, its attention, the loss chunk), the plan's activations against the
live-tensor peak of a real 2-rank CPU step, read from the profiler's allocation events. The real
step is the trainer's (load from the config, prepare_lm's switches and ring, LossModel's chunked
loss, local_batch's shards), with ZeRO's one effect on activations emulated: a weight's gradient
leaves once whole (DeepSpeed reduces it into a partition). No simulator code runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.procs import spawn
from tests.helpers.trainrun import recipe

pytestmark = pytest.mark.multiprocess

BASE = {"model_type": "llama", "num_hidden_layers": 2, "max_position_embeddings": 16384, "tie_word_embeddings": False}
PHASES = {  # phase: (architecture, recipe switches, seq_len over 2 ranks)
    "layer backward (MLP)": (
        {
            "hidden_size": 128,
            "intermediate_size": 2048,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 256,
        },
        {"rmsnorm": "chunked", "loss_chunk_tokens": 512},
        8192,
    ),  # fmt: skip
    "layer backward (norm)": (
        {
            "hidden_size": 1024,
            "intermediate_size": 1024,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "vocab_size": 256,
        },
        {"mlp_tiles": 8, "loss_chunk_tokens": 512},
        8192,
    ),  # fmt: skip
    "layer backward (attention)": (
        {
            "hidden_size": 256,
            "intermediate_size": 256,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 256,
        },
        {"rmsnorm": "chunked", "loss_chunk_tokens": 512},
        8192,
    ),  # fmt: skip
    "loss chunk": (
        {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 32000,
        },
        {"loss_chunk_tokens": 2048},
        8192,
    ),  # fmt: skip
}


def _plan(tmp: Path, data: Path, phase: str):
    from ringpatch.plan.budget import on_device
    from ringpatch.plan.preflight import preflight

    cfg, switches, seq_len = PHASES[phase]
    path = recipe(tmp, data, parallel__sp=2, model__config={**BASE, **cfg}, model__dtype="float32", micro_batch=1,
                  stages=[{"seq_len": seq_len, "steps": 1}], **switches)  # fmt: skip
    return on_device(preflight(str(path), world=2), "cpu")


def _real_step(rank, world, tmp, data, phase, out):
    from torch.profiler import ProfilerActivity, profile

    from ringpatch.parallel import build_mesh
    from ringpatch.plan.model import LossModel, lm_from_config, local_batch, prepare_lm
    from ringpatch.plan.tracker import live_peak

    plan = _plan(Path(tmp), Path(data), phase)
    mesh = build_mesh(plan.dims, "cpu")
    torch.manual_seed(0)
    lm = prepare_lm(plan, lm_from_config(plan.model_config, bf16=False), mesh)
    model = LossModel(lm, chunk_tokens=plan.recipe.loss_chunk_tokens).train()
    for p in model.parameters():  # ZeRO takes a gradient once it is whole (a tiled MLP's after its last tile)
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None) if getattr(p, "ds_grad_is_ready", True) else None)  # fmt: skip
    seq_len = plan.recipe.stages[0].seq_len
    ids = torch.randint(0, plan.model_config["vocab_size"], (1, seq_len), generator=torch.Generator().manual_seed(1))
    rows = {"input_ids": ids, "doc_position_ids": torch.arange(seq_len)[None]}
    batch = local_batch(rows, plan.recipe, mesh)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(**batch).backward()
    if rank == 0:
        Path(out).write_text(json.dumps({"live_peak": live_peak(prof)}))


@pytest.mark.parametrize("phase", list(PHASES))
def test_the_phase_that_sets_the_peak_is_planned_as_a_real_step_holds_it(phase, tmp_path, data):
    """The plan names `phase` as the step's largest backward, and its activations (model states,
    DeepSpeed's buffers and the reserve left out) are within 5% of the real step's live peak."""
    from ringpatch.plan.budget import estimate
    from ringpatch.plan.estimate import total_gib
    from ringpatch.plan.items import Kind, Phase

    plan = _plan(tmp_path, data, phase)
    items = estimate(plan.recipe, plan.model_config, 2, plan.recipe.stages[0].seq_len, 1, bf16=False, cuda=False)
    activations = {k: v for k, v in items.items() if k.kind is Kind.ACTIVATION}
    backwards = {k: v for k, v in activations.items() if k.phase is not Phase.STEP}
    assert str(max(backwards, key=backwards.get)) == phase, backwards
    out = tmp_path / "real.json"
    spawn(_real_step, 2, str(tmp_path), str(data), phase, str(out))
    measured = json.loads(out.read_text())["live_peak"] / 2**30
    planned = total_gib(activations)
    print(f"{phase}: planned {planned:.4f} GiB, real step {measured:.4f} GiB, ratio {planned / measured:.3f}")
    assert planned == pytest.approx(measured, rel=0.05), (phase, planned, measured, activations)
