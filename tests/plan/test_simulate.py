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
    from ringpatch.plan.preflight import preflight

    path = recipe(tmp, data, parallel__sp=2, model__config=CFG, stages=[{"seq_len": 8192, "steps": 1}],
                  micro_batch=1, loss_chunk_tokens=1024, **switches)  # fmt: skip
    return preflight(str(path), world=2)


def _real_step(rank, world, tmp, data, switches, out):
    """The trainer's model and batch on real CPU tensors over 2 gloo ranks; the live-tensor peak
    from the profiler's allocation events (not the simulator's tracker)."""
    from torch.profiler import ProfilerActivity, profile

    from ringpatch.parallel import build_mesh
    from ringpatch.plan.model import lm_from_config
    from ringpatch.plan.simulate import step_batch, step_model
    from ringpatch.plan.tracker import live_peak

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
    from ringpatch.plan.simulate import simulate

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
    from ringpatch.plan.budget import estimate, on_device
    from ringpatch.plan.estimate import total_gib
    from ringpatch.plan.preflight import preflight
    from ringpatch.plan.simulate import simulate

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


def _draw(rng) -> tuple[dict, dict, tuple[int, ...] | None]:
    """A random architecture, recipe and batch: grid, Ulysses, layout, precision, length, loss chunk,
    every memory switch, and one document a row or several packed."""
    heads = rng.choice([4, 8, 16, 32])
    kv = rng.choice([d for d in (1, 2, 4, 8, heads) if heads % d == 0])
    hidden = heads * rng.choice([64, 128])
    cfg = {"model_type": rng.choice(["llama", "mistral", "qwen2"]), "num_hidden_layers": 2, "hidden_size": hidden,
           "intermediate_size": int(hidden * rng.choice([2.5, 2.6875, 3.5])) // 64 * 64,
           "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": 8192,
           "vocab_size": rng.choice([1024, 32000, 50000, 128256]), "tie_word_embeddings": rng.random() < 0.3}  # fmt: skip
    sp = rng.choice([2, 4, 8])
    seq_len = rng.choice([2048, 4096, 8192, 16384]) * sp // 2
    changes = {"parallel__sp": sp, "parallel__ulysses": rng.choice([u for u in (1, 2, 4) if sp % u == 0 and heads % u == 0]),
               "parallel__layout": rng.choice(["balanced", "zigzag", "contiguous"]),
               "model__dtype": rng.choice(["bfloat16", "float32"]), "micro_batch": 1, "zero__stage": 3,
               "stages": [{"seq_len": seq_len, "steps": 1}], "loss_chunk_tokens": rng.choice([1024, 2048, 4096]),
               "rmsnorm": rng.choice(["stock", "chunked"]), "activation_checkpointing": rng.random() < 0.8}  # fmt: skip
    if changes["activation_checkpointing"]:
        changes |= {"activation_offload": rng.random() < 0.4, "mlp_tiles": rng.choice([1, 1, 4, 8])}
        changes |= rng.choice([{}, {"keep_attention": True}, {"uncheckpointed_layers": 1}])
    documents = None
    if rng.random() < 0.4:  # packed documents, some shorter than a rank's part
        cuts = sorted(rng.sample(range(1, seq_len), rng.randint(1, 6)))
        documents = tuple(b - a for a, b in zip([0, *cuts], [*cuts, seq_len], strict=True))
    return cfg, changes, documents


def test_the_plans_activations_follow_the_simulated_rank_at_random_shapes(tmp_path, data):
    """The plan's activations (its items of the step's tensors: model states, DeepSpeed's buffers
    and the reserve left out) within 5% of the simulated rank's peak, the larger of the ring's first
    and last rank, at 40 configurations drawn by a seeded generator, none of them a shape the
    arithmetic was written at: architecture, grid, Ulysses, layout, length, loss chunk, every memory
    switch and packed documents, each as it trains: bfloat16 on GPUs (the CUDA kernels' calls),
    float32 on CPU processes (the CPU kernel's). (float32 on a GPU runs the memory-efficient kernel,
    whose working set the plan counts within -7% to +16%: docs/memory.md.)"""
    import random

    from ringpatch.plan.budget import estimate, on_device
    from ringpatch.plan.estimate import total_gib
    from ringpatch.plan.items import Kind
    from ringpatch.plan.preflight import preflight
    from ringpatch.plan.simulate import simulate

    rng, ratios, misses = random.Random(20261206), [], []
    for _ in range(40):
        cfg, changes, documents = _draw(rng)
        device = "cuda" if changes["model__dtype"] == "bfloat16" else "cpu"
        path = recipe(tmp_path, data, model__config=cfg, **changes)
        plan = on_device(preflight(str(path), world=changes["parallel__sp"]), device)
        # rank 0 and the ring's last rank, whose two chunks are neighbours (its calls span both)
        ranks = {0, plan.dims.sp // plan.dims.ulysses - 1}
        sims = [simulate(plan, rank=r * plan.dims.ulysses, kernel=device, documents=documents) for r in ranks]
        # a CPU run's offloaded activations stay in its one memory: its plan counts them as an item
        simulated = max(sum(sim.peak.values()) if plan.cuda else sim.total_peak for sim in sims)
        planned = estimate(plan.recipe, plan.model_config, plan.dims.world, plan.recipe.stages[0].seq_len, 1,
                           plan.bf16, plan.cuda)  # fmt: skip
        ratio = total_gib({k: v for k, v in planned.items() if k.kind is Kind.ACTIVATION}) / simulated
        ratios.append(ratio)
        if not 0.95 <= ratio <= 1.05:
            misses.append((round(ratio, 3), cfg, changes, documents))
    print(f"planned / simulated activations at 40 random configurations: {min(ratios):.3f} .. {max(ratios):.3f}")
    assert not misses, "\n".join(str(m) for m in misses)


def test_the_simulated_step_launches_packed_documents_as_one_document(tmp_path, data):
    """The CUDA module's calls, counted over a whole simulated step (3 layers, recompute and backward,
    8 ranks, balanced layout): a row of 96 lognormal documents makes at most twice the attention
    kernel calls of one document, and fewer than one call per document made."""
    import math
    import random

    from ringpatch.attention.kernels import TorchCUDA
    from ringpatch.plan.preflight import preflight
    from ringpatch.plan.simulate import simulate

    seq, rng = 2**15, random.Random(0)
    mu, cuts = math.log(seq / 96) - 0.5, [0]
    while (nxt := cuts[-1] + max(1, int(rng.lognormvariate(mu, 1.0)))) < seq:
        cuts.append(nxt)
    lengths = tuple(b - a for a, b in zip(cuts, [*cuts[1:], seq], strict=True))
    path = recipe(tmp_path, data, parallel__sp=8, parallel__layout="balanced", model__config=CFG,
                  stages=[{"seq_len": seq, "steps": 1}], micro_batch=1, data__document_masking=True,
                  model__dtype="bfloat16")  # fmt: skip
    plan = preflight(str(path), world=8)  # bf16: the flash calls a GPU makes
    one = simulate(plan, kernel="cuda").kernel_calls
    packed = simulate(plan, kernel="cuda", documents=lengths).kernel_calls
    original = TorchCUDA.varlen
    try:
        TorchCUDA.varlen = False  # the ring hands each document's call alone, as before
        per_document = simulate(plan, kernel="cuda", documents=lengths).kernel_calls
    finally:
        TorchCUDA.varlen = original
    print(f"{len(lengths)} documents, attention kernel calls in a step (forward incl. recompute / backward): "
          f"one document {one['forward']}/{one['backward']}, one call per document "
          f"{per_document['forward']}/{per_document['backward']}, packed {packed['forward']}/{packed['backward']}")  # fmt: skip
    for phase in ("forward", "backward"):
        assert 0 < packed[phase] <= 2 * one[phase] and packed[phase] < per_document[phase], (phase, one, packed)
