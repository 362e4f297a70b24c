"""Ring attention vs monolithic attention, side by side in one run (CPU).

Causal forward+backward, 8 heads of 64, float32. Ring: P processes with 1 thread each
(gloo); monolithic: torch's fused attention in one process with P threads, so both use the
same cores. Prints ratios (ring time / monolithic time; the limit is 1.0) and writes JSON.
With --ulysses U (dividing P) it also runs Ulysses x ring (U x P/U) on the same inputs: on one
host its all-to-alls cost what the ring's steps save, so the ratio shows the overhead of the
two-level scheme's extra copies, not its gain on a cluster (traffic: ringpatch plan).

    python bench/attention.py                       # S = 16K, 32K; P = 2; Ulysses 2
    python bench/attention.py --seq 4096 --reps 1   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ringpatch  # noqa: E402
from bench.targets import Verdicts  # noqa: E402

HEADS, DIM = 8, 64


def _step(fn, q, k, v) -> float:
    """Seconds for one forward+backward."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    start = time.perf_counter()
    out = fn(q, k, v)
    out.backward(torch.ones_like(out))
    return time.perf_counter() - start


def _inputs(seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, seq, HEADS, DIM, generator=g) for _ in range(3)]


def monolithic_times(seq: int, reps: int, threads: int) -> list[float]:
    torch.set_num_threads(threads)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)

    q, k, v = _inputs(seq)
    _step(fn, *(x[:, :1024] for x in (q, k, v)))  # warm-up: allocator, thread pool
    return [_step(fn, q, k, v) for _ in range(reps)]


def _ring_worker(rank, world, store, seq, reps, configs, result_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    full = _inputs(seq)
    groups = {u: ringpatch.ulysses_ring_group(u) for u in sorted({c[3] for c in configs if c[3] > 1})}
    for name, layout, window, ulysses in configs:
        group = groups.get(ulysses)
        q, k, v = (ringpatch.shard(x, group=group, layout=layout) for x in full)

        def fn(q, k, v, layout=layout, window=window, group=group):
            return ringpatch.ring_attention(q, k, v, group=group, causal=True, window=window, layout=layout)

        small = [ringpatch.shard(x[:, : 256 * world], group=group, layout=layout) for x in full]
        _step(fn, *small)  # warm-up
        times = []
        for _ in range(reps):
            dist.barrier()
            t = torch.tensor([_step(fn, q, k, v)], dtype=torch.float64)
            per_rank = [torch.zeros_like(t) for _ in range(world)]
            dist.all_gather(per_rank, t)
            times.append([x.item() for x in per_rank])
        results[name] = times
    if rank == 0:
        Path(result_path).write_text(json.dumps(results))
    dist.destroy_process_group()


def ring_times(seq: int, reps: int, world: int, configs) -> dict[str, list[list[float]]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ring.json")
        mp.spawn(_ring_worker, args=(world, os.path.join(tmp, "store"), seq, reps, configs, out), nprocs=world)
        return json.loads(Path(out).read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--window", type=int, default=4096, help="window for the windowed run at the largest S")
    parser.add_argument("--ulysses", type=int, default=2, help="Ulysses degree of the Ulysses x ring run (1: none)")
    parser.add_argument("--out", default="bench/results/attention.json")
    args = parser.parse_args()

    rows, verdicts = [], Verdicts()
    for seq in args.seq:
        configs = [("zigzag", "zigzag", None, 1), ("contiguous", "contiguous", None, 1)]
        if args.ulysses > 1:
            configs.append((f"ulysses{args.ulysses}_zigzag", "zigzag", None, args.ulysses))
        if seq == max(args.seq):
            configs.append((f"zigzag_window{args.window}", "zigzag", args.window, 1))
        # monolithic before and after the ring runs: both halves of the noise are seen
        mono = monolithic_times(seq, (args.reps + 1) // 2, args.world)
        ring = ring_times(seq, args.reps, args.world, configs)
        mono += monolithic_times(seq, args.reps // 2, args.world)  # as many samples as the ring
        mono_best = min(mono)
        row = {"seq": seq, "world": args.world, "monolithic_s": mono, "monolithic_best_s": mono_best}
        for name, times in ring.items():
            step = min(max(per_rank) for per_rank in times)  # a step ends when its slowest rank does
            row[name] = {"per_rank_s": times, "best_s": step, "ratio_vs_monolithic": step / mono_best}
        if f"zigzag_window{args.window}" in row:
            row["window_vs_causal"] = row[f"zigzag_window{args.window}"]["best_s"] / row["zigzag"]["best_s"]
        if f"ulysses{args.ulysses}_zigzag" in row:
            row["ulysses_vs_ring"] = row[f"ulysses{args.ulysses}_zigzag"]["best_s"] / row["zigzag"]["best_s"]
        rows.append(row)
        print(f"S={seq:>6}  monolithic {mono_best:7.2f}s ({args.world} threads)")
        for name in ring:
            r = row[name]
            print(f"          ring {name:<20} {r['best_s']:7.2f}s  ratio {r['ratio_vs_monolithic']:.3f}")
        if "window_vs_causal" in row:
            print(f"          windowed / unwindowed causal (zigzag): {row['window_vs_causal']:.3f}")
        verdicts.check("attention.ring_vs_monolithic", row["zigzag"]["ratio_vs_monolithic"], f"S={seq}")
        if "ulysses_vs_ring" in row:
            print(
                f"          Ulysses {args.ulysses} x ring {args.world // args.ulysses} / ring {args.world}: "
                f"{row['ulysses_vs_ring']:.3f}"
            )
        sys.stdout.flush()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "heads": HEADS, "head_dim": DIM}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return verdicts.exit_code()


if __name__ == "__main__":
    sys.exit(main())
