"""The simulated rank: held to a real run of the same code on CPU, and the planner held to it at the
one-node 1M stage's real shape."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import HANG_S, ROOT
from tests.helpers.procs import spawn
from tests.helpers.trainrun import recipe

pytestmark = pytest.mark.multiprocess

CFG = {"model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 352,
       "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
       "max_position_embeddings": 8192, "tie_word_embeddings": False}  # fmt: skip
SWITCHES = {
    "no checkpointing": dict(activation_checkpointing=False),
    "checkpointing": {},
    "activation_offload": dict(activation_offload=True),
    "keep_attention": dict(keep_attention=True),
    "mlp_tiles": dict(mlp_tiles=4),
    "uncheckpointed_layers": dict(uncheckpointed_layers=2),
}


def _plan(tmp: Path, data: Path, switches: dict):
    from ringpatch.train.preflight import preflight

    path = recipe(tmp, data, parallel__sp=2, model__config=CFG, stages=[{"seq_len": 8192, "steps": 1}],
                  micro_batch=1, loss_chunk_tokens=1024, **switches)  # fmt: skip
    return preflight(str(path), world=2)


def _real_step(rank, world, tmp, data, switches, out):
    """The trainer's model and batch on real CPU tensors over 2 gloo ranks; the live-tensor peak
    from the profiler's allocation events (not the simulator's tracker)."""
    from torch.profiler import ProfilerActivity, profile

    from ringpatch.memory.tracker import live_peak
    from ringpatch.parallel import build_mesh
    from ringpatch.train.build import lm_from_config
    from ringpatch.train.simulate import step_batch, step_model

    plan = _plan(Path(tmp), Path(data), switches)
    mesh = build_mesh(plan.dims, "cpu")
    torch.manual_seed(0)
    model = step_model(plan, lm_from_config(plan.model_config, plan.bf16), mesh)
    local = step_batch(plan, mesh, 0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(**local).backward()
    if rank == 0:
        Path(out).write_text(json.dumps({"live_peak": live_peak(prof)}))


@pytest.mark.parametrize("name", list(SWITCHES))
def test_the_simulated_rank_holds_what_a_real_run_holds(name, tmp_path, data):
    """Live-tensor peak of rank 0 of a real 2-rank CPU step against the simulated rank 0 of the same
    recipe (fake tensors, fake group, the CPU kernel): within 3%, for each memory switch."""
    from ringpatch.train.simulate import simulate

    out = tmp_path / "real.json"
    spawn(_real_step, 2, str(tmp_path), str(data), SWITCHES[name], str(out))
    measured = json.loads(out.read_text())["live_peak"] / 2**30
    simulated = simulate(_plan(tmp_path, data, SWITCHES[name]), kernel="cpu").total_peak
    assert simulated == pytest.approx(measured, rel=0.03), (name, simulated, measured)


def test_the_planner_matches_the_simulated_one_node_1m_stage():
    """recipes/llama3-8b-1m-1node.yaml's 1M stage, one rank of 8 at its real shape (131,072 tokens
    a GPU, Llama-3-8B's layer, bf16, the CUDA kernels' calls), two of its 32 layers: with the
    layer inputs offloaded, the device peak does not grow with depth (the full 32 layers simulate
    to the same activations: bench/simulate.py). The planner's peak is within 5% of it, and the
    step reads device data into Python a fixed number of times, whatever the depth."""
    from ringpatch.memory.estimate import total_gib
    from ringpatch.train.plan import estimate, on_device
    from ringpatch.train.preflight import preflight
    from ringpatch.train.simulate import simulate

    plan = on_device(preflight(str(ROOT / "recipes" / "llama3-8b-1m-1node.yaml"), world=8), "cuda")
    syncs = []
    for layers in (1, 2):
        shallow = dataclasses.replace(plan, model_config=dict(plan.model_config, num_hidden_layers=layers))
        sim = simulate(shallow)
        syncs.append(sum(sim.syncs.values()))
    assert (sim.seq_len, sim.tokens) == (1 << 20, 131072)
    planned = total_gib(estimate(plan.recipe, shallow.model_config, 8, sim.seq_len, 1, bf16=True))
    assert planned == pytest.approx(sim.total_gib, rel=0.05), (planned, sim.total_gib, sim.peak)
    assert syncs[0] == syncs[1] <= 2, sim.syncs
    assert sim.largest_numel < 2**31


def test_simulate_refuses_what_it_cannot_run_in_one_line(tmp_path, data):
    """A model type the simulator has not been checked on, and tensor parallelism, stop with one
    line before any work; a plan whose simulated peak does not fit --gpu-memory names its items."""
    gpt2 = recipe(tmp_path, data, model__config={"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4})
    for path, expected in (
        (gpt2, "ringpatch plan: --simulate runs llama, mistral, qwen2, qwen3 layers; tiny is 'gpt2'"),
        (recipe(tmp_path, data, parallel__tp=2), "ringpatch plan: --simulate runs tp = 1"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "ringpatch.cli", "plan", "--recipe", str(path), "--nodes", "1", "--gpus-per-node",
             "2", "--simulate"], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S,
        )  # fmt: skip
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(expected), proc.stderr
    path = recipe(tmp_path, data, parallel__sp=2, stages=[{"seq_len": 4096, "steps": 1}])
    proc = subprocess.run(
        [sys.executable, "-m", "ringpatch.cli", "plan", "--recipe", str(path), "--nodes", "1", "--gpus-per-node", "2",
         "--simulate", "--gpu-memory", "0.5"], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "ringpatch plan: the simulated rank needs" in proc.stderr and "Live at its peak:" in proc.stderr
