"""Packed documents: how evenly the layouts share the work, and what document masking costs.

1. Balance (the planner's arithmetic, no timing): attended (query, key) pairs per rank for
   length mixes at S tokens on P ranks, worst rank / mean, zigzag vs balanced, over 20 draws
   of each mix: lognormal lengths with mean S/16 and S/8 (sigma 0.5 and 1.0), a few long
   documents among many short ones, 8 equal documents.
2. Time on P CPU processes (1 thread each, gloo), side by side in one run: causal
   forward+backward with documents divided by the same without documents (plain causal), at the
   same S, 8 heads of 64, float32, balanced layout. The ideal ratio is the attended pairs with
   documents over the causal pairs; the bench prints both.

    python bench/documents.py                      # S = 32K, P = 2 (make bench)
    python bench/documents.py --seq 8192 --reps 1  # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ringpatch  # noqa: E402
from ringpatch.attention.blocks import call_work  # noqa: E402
from ringpatch.attention.ring import ring_plans  # noqa: E402

HEADS, DIM = 8, 64


def lognormal(seq: int, mean: float, sigma: float, rng: random.Random) -> tuple[int, ...]:
    """Document starts with lognormal lengths of the given mean (at least 1 token each)."""
    mu, starts = math.log(mean) - sigma**2 / 2, [0]
    while (nxt := starts[-1] + max(1, int(rng.lognormvariate(mu, sigma)))) < seq:
        starts.append(nxt)
    return tuple(starts)


def long_among_short(seq: int, rng: random.Random) -> tuple[int, ...]:
    """Three documents of S/8 at random places among short ones (mean S/256)."""
    lengths, left = [seq // 8] * 3, seq - 3 * (seq // 8)
    while left > 0:
        n = min(left, max(1, int(rng.expovariate(256 / seq))))
        lengths.append(n)
        left -= n
    rng.shuffle(lengths)
    return tuple(sum(lengths[:i]) for i in range(len(lengths)))


def mixes(seq: int):
    return {
        "lognormal S/16 s=0.5": lambda rng: lognormal(seq, seq / 16, 0.5, rng),
        "lognormal S/16 s=1.0": lambda rng: lognormal(seq, seq / 16, 1.0, rng),
        "lognormal S/8 s=0.5": lambda rng: lognormal(seq, seq / 8, 0.5, rng),
        "lognormal S/8 s=1.0": lambda rng: lognormal(seq, seq / 8, 1.0, rng),
        "3 long among short": lambda rng: long_among_short(seq, rng),
        "8 equal": lambda rng: tuple(range(0, seq, seq // 8)),
    }


def rank_work(layout: str, seq: int, world: int, docs) -> list[float]:
    plans = ring_plans(layout, seq, world, True, None, None, docs)
    return [sum(call_work(c) for calls in plans[r] for c in calls) for r in range(world)]


def balance(seq: int, worlds, draws: int) -> list[dict]:
    rows = []
    for world in worlds:
        for name, make in mixes(seq).items():
            row = {"world": world, "mix": name}
            for layout in ("zigzag", "balanced"):
                ratios = []
                for seed in range(draws):
                    work = rank_work(layout, seq, world, make(random.Random(seed)))
                    ratios.append(max(work) / statistics.mean(work))
                row[layout] = {"mean": statistics.mean(ratios), "worst": max(ratios)}
            rows.append(row)
            print(
                f"P={world} {name:<22} worst rank / mean: zigzag {row['zigzag']['mean']:.3f} "
                f"(worst draw {row['zigzag']['worst']:.3f})  balanced {row['balanced']['mean']:.3f} "
                f"(worst draw {row['balanced']['worst']:.3f})"
            )
            sys.stdout.flush()
    return rows


def attended_fraction(seq: int, docs) -> float:
    """Causal pairs inside documents over causal pairs of the whole sequence."""
    ends = [*docs[1:], seq]
    inside = sum((e - s) * (e - s + 1) / 2 for s, e in zip(docs, ends, strict=True))
    return inside / (seq * (seq + 1) / 2)


def _step(q, k, v, layout, cu_seqlens) -> float:
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    start = time.perf_counter()
    out = ringpatch.ring_attention(q, k, v, layout=layout, cu_seqlens=cu_seqlens)
    out.backward(torch.ones_like(out))
    return time.perf_counter() - start


def _timing_worker(rank, world, store, seq, reps, cases, result_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, seq, HEADS, DIM, generator=g) for _ in range(3)]
    small = [ringpatch.shard(x[:, : 256 * world]) for x in full]
    _step(*small, "zigzag", None)  # warm-up
    results = {}
    for name, docs in cases:
        cu = None if docs is None else [*docs, seq]
        q, k, v = (ringpatch.shard(x, layout="balanced", cu_seqlens=cu) for x in full)
        times = []
        for _ in range(reps):
            dist.barrier()
            t = torch.tensor([_step(q, k, v, "balanced", cu)], dtype=torch.float64)
            per_rank = [torch.zeros_like(t) for _ in range(world)]
            dist.all_gather(per_rank, t)
            times.append(max(x.item() for x in per_rank))  # a step ends when its slowest rank does
        results[name] = times
    if rank == 0:
        Path(result_path).write_text(json.dumps(results))
    dist.destroy_process_group()


def timing(seq: int, world: int, reps: int) -> list[dict]:
    rng = random.Random(1)
    cases = [
        ("causal (no documents)", None),
        ("8 equal documents", tuple(range(0, seq, seq // 8))),
        ("lognormal S/8 s=0.5", lognormal(seq, seq / 8, 0.5, rng)),
        ("lognormal S/8 s=1.0", lognormal(seq, seq / 8, 1.0, rng)),
    ]
    # the causal baseline first and last, so both halves of the machine's noise are seen
    order = [cases[0], *cases[1:], ("causal (again)", None)]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.spawn(_timing_worker, args=(world, os.path.join(tmp, "store"), seq, reps, order, out), nprocs=world)
        times = json.loads(Path(out).read_text())
    causal = min(times["causal (no documents)"] + times["causal (again)"])
    rows = []
    print(f"S={seq} on {world} CPU ranks, balanced layout: causal fwd+bwd {causal:.2f}s (best of {2 * reps})")
    for name, docs in cases[1:]:
        best = min(times[name])
        ideal = attended_fraction(seq, docs)
        row = {"case": name, "documents": len(docs), "best_s": best, "ratio": best / causal, "ideal": ideal}
        row["ratio_over_ideal"] = row["ratio"] / ideal
        rows.append(row)
        print(
            f"  {name:<22} {len(docs):>3} documents  {best:7.2f}s  ratio to causal {row['ratio']:.3f}  "
            f"ideal {ideal:.3f}  ratio / ideal {row['ratio_over_ideal']:.2f}"
        )
        sys.stdout.flush()
    return [{"case": "causal", "times_s": times["causal (no documents)"] + times["causal (again)"]}, *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--out", default="bench/results/documents.json")
    args = parser.parse_args()
    print("1. balance: attended pairs of the worst rank / the mean, over draws of each mix")
    balance_rows = balance(args.seq, [2, 4, 8], args.draws)
    print("2. time")
    timing_rows = timing(args.seq, args.world, args.reps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "heads": HEADS, "head_dim": DIM, "seq": args.seq}
    Path(args.out).write_text(json.dumps({"meta": meta, "balance": balance_rows, "timing": timing_rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
