"""The planner against the simulated rank at every shipped recipe's real shape, and what only a real
shape shows.

    python bench/simulate.py                  # every cluster recipe, its longest stage, full depth
    python bench/simulate.py --layers 2       # the same at 2 layers (what the test runs)

For each recipe: one rank of its grid simulated through a training step of its longest stage
(ringpatch/plan/simulate.py: the CUDA kernels' calls on fake tensors), beside the planner's
tensors (ringpatch/plan/estimate.py), both with ZeRO's arithmetic model states, GiB per GPU;
the ratio must stay within [0.95, 1.05]. Then, at 1M and 4M tokens: the block planner's and the
balanced layout's host time (no structure may grow with S^2), and the largest index a kernel sees
(below 2^31, or a 32-bit index would overflow). Results go to bench/results/simulate.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.targets import Verdicts  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")

RECIPES = {  # recipe: GPUs it is written for
    "llama3-8b-256k-1node": 8,
    "llama3-8b-1m-1node": 8,
    "llama3-8b-1m": 32,
    "mistral-7b-512k": 16,
    "llama3-8b-4m": 32,
}


def compare(name: str, world: int, layers: int | None) -> dict:
    from ringpatch.plan.budget import estimate, on_device
    from ringpatch.plan.estimate import total_gib
    from ringpatch.plan.preflight import preflight
    from ringpatch.plan.simulate import simulate

    plan = on_device(preflight(str(ROOT / "recipes" / f"{name}.yaml"), world=world), "cuda")
    if layers:
        plan = dataclasses.replace(plan, model_config=dict(plan.model_config, num_hidden_layers=layers))
    sim = simulate(plan)
    s = plan.recipe.stages[sim.stage]
    planned = total_gib(estimate(plan.recipe, plan.model_config, world, s.seq_len, sim.micro_batch, plan.bf16))
    return {
        "recipe": name,
        "stage": sim.stage,
        "seq_len": s.seq_len,
        "tokens": sim.tokens,
        "layers": plan.model_config["num_hidden_layers"],
        "planned_gib": planned,
        "simulated_gib": sim.total_gib,
        "ratio": planned / sim.total_gib,
        "peak": sim.peak,
        "host": sim.host,
        "flops": sim.flops,
        "syncs": sum(sim.syncs.values()),
        "largest_numel": sim.largest_numel,
        "seconds": sim.seconds,
    }


def host_structures() -> list[dict]:
    """The block planner and the balanced placement at 1M and 4M tokens, one document a row and
    packed 8K-token documents: host seconds, which must grow about linearly with the length."""
    from ringpatch.attention.layout import local_ranges
    from ringpatch.attention.ring import ring_plans

    rows = []
    for seq, sp in ((1 << 20, 8), (1 << 22, 32)):
        for doc in (None, 8192):
            docs = None if doc is None else tuple(range(0, seq, doc))
            started = time.perf_counter()
            ranges = [local_ranges("balanced", seq, sp, r, docs) for r in range(sp)]
            placed = time.perf_counter() - started
            started = time.perf_counter()
            plans = ring_plans("balanced" if docs else "zigzag", seq, sp, True, None, 1024, docs)
            planned = time.perf_counter() - started
            calls = sum(len(step) for plan in plans for step in plan)
            rows.append(
                {"seq_len": seq, "sp": sp, "doc_tokens": doc, "place_s": placed, "plan_s": planned, "calls": calls}
            )
            assert len(ranges) == sp
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, help="simulate this many layers of each model (default: all)")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    args = parser.parse_args()
    rows = []
    print("recipe                  stage  seq_len    tokens/GPU  layers  planned  simulated  ratio   time")
    for name in args.recipes:
        row = compare(name, RECIPES[name], args.layers)
        rows.append(row)
        print(
            f"{name:<22} {row['stage']:>6}  {row['seq_len']:>9,}  {row['tokens']:>10,}  {row['layers']:>6}  "
            f"{row['planned_gib']:7.2f}  {row['simulated_gib']:9.2f}  {row['ratio']:5.3f}  {row['seconds']:5.0f}s",
            flush=True,
        )
    ratios = [r["ratio"] for r in rows]
    print(f"planned / simulated: {min(ratios):.3f} .. {max(ratios):.3f}")
    verdicts = Verdicts()
    for r in rows:
        verdicts.check("simulate.planned_vs_simulated", r["ratio"], r["recipe"])
    print(f"host syncs per step: {sorted({r['syncs'] for r in rows})}")
    print(f"largest tensor a kernel sees: {max(r['largest_numel'] for r in rows):,} elements (2^31 = {2**31:,})")
    for label, budget in (("head groups (shipped)", None), ("all heads at once", 2**62)):
        r = ring_layer(group_bytes=budget)
        print(
            f"one ring layer, Llama-3-8B attention, 131,072 tokens a rank of 8, {label}: forward peak "
            f"{r['forward_gib']:.2f} GiB, forward + backward {r['step_gib']:.2f} GiB above q, k, v"
        )
    structures = host_structures()
    for r in structures:
        print(
            f"block plan at {r['seq_len']:,} tokens over {r['sp']} ranks, documents of {r['doc_tokens'] or 'a row'}: "
            f"placement {r['place_s'] * 1e3:.1f} ms, plan {r['plan_s'] * 1e3:.1f} ms ({r['calls']:,} calls)"
        )
    out = ROOT / "bench" / "results" / "simulate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"recipes": rows, "host_structures": structures}, indent=1))
    print(f"wrote {out}")
    return verdicts.exit_code()


def ring_layer(tokens: int = 131072, world: int = 8, group_bytes: int | None = None) -> dict:
    """One ring attention call at Llama-3-8B's attention shape (32/8 heads of 128, bf16), forward
    and backward on fake tensors over a fake group: the peak of what the ring allocates above its
    inputs (GiB), with head groups as shipped, or with `group_bytes` per group."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    import ringpatch
    from ringpatch.attention import ring
    from ringpatch.plan.simulate import SimulatedCUDA, fake_world
    from ringpatch.plan.tracker import StorageTracker

    default = ring.GROUP_BYTES
    ring.GROUP_BYTES = default if group_bytes is None else group_bytes
    try:
        with fake_world(world), FakeTensorMode(allow_non_fake_inputs=True):
            q = torch.empty(1, tokens, 32, 128, dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.empty(1, tokens, 8, 128, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
            dout = torch.empty(1, tokens, 32, 128, dtype=torch.bfloat16)
            tracker = StorageTracker(lambda: ("device", "ring"))
            with tracker:
                out = ringpatch.ring_attention(q, k, v, backend=SimulatedCUDA(), agreed=True)
                forward = tracker.peak["device"]
                out.backward(dout)
    finally:
        ring.GROUP_BYTES = default
    return {"forward_gib": forward / 2**30, "step_gib": tracker.peak["device"] / 2**30}


if __name__ == "__main__":
    sys.exit(main())
