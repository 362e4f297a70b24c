"""A training step of a Llama-shaped model: ring-patched on P processes vs unpatched in one.

Model: hidden 256, 4 layers, 8 heads, 2 kv heads, vocab 32000 (built from a config).
Patched: P processes x 1 thread (gloo), ringpatch.patch_model + shard_batch. Unpatched:
one process x P threads, transformers' sdpa attention. Each run is a fresh process, so its
peak RSS is its own. Prints and records (JSON):
  - time ratio patched / unpatched at S and peak RSS per rank as a fraction
    of the unpatched process, both with the HF loss (full logits);
  - the longest S that fits a per-process memory budget, from linear fits of peak RSS vs S;
  - peak RSS of the patched step with causal_lm_loss (chunked logits) up to S = 64K: it
    grows linearly in S (an S x S attention buffer at 64K would be 128 GiB per layer).
The two ratios are held to bench/targets.py; a miss exits 1.

    python bench/model.py                      # S = 32K, memory points 4K-16K, long run 64K
    python bench/model.py --seq 8192 --memory-seq 2048 4096 --long 16384   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ringpatch  # noqa: E402
from bench.targets import Verdicts  # noqa: E402

GIB = 1024**3


def build_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=131072,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _batch(seq):
    ids = torch.randint(0, 32000, (1, seq), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def _step(model, batch, patched: bool, chunked: bool) -> None:
    if patched:
        local = ringpatch.shard_batch(batch)
        loss = ringpatch.causal_lm_loss(model, local) if chunked else model(**local).loss
    else:
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def _worker(rank, world, store, seq, patched, chunked, threads, out_dir):
    torch.set_num_threads(threads)
    if patched:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = build_model()
    if patched:
        ringpatch.patch_model(model)
    _step(model, _batch(256 * max(world, 2)), patched, chunked)  # warm-up
    before = _rss_bytes()
    if patched:
        dist.barrier()
    start = time.perf_counter()
    _step(model, _batch(seq), patched, chunked)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    Path(out_dir, f"{rank}.json").write_text(json.dumps({"s": seconds, "peak": peak, "before": before}))
    if patched:
        dist.destroy_process_group()


def measure(seq, patched, world, chunked=False) -> dict:
    """Step seconds (slowest rank) and peak RSS (largest rank) of one fresh run."""
    procs, threads = (world, 1) if patched else (1, world)
    with tempfile.TemporaryDirectory() as tmp:
        args = (procs, os.path.join(tmp, "store"), seq, patched, chunked, threads, tmp)
        mp.spawn(_worker, args=args, nprocs=procs)
        ranks = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(procs)]
    return {
        "seconds": max(r["s"] for r in ranks),
        "peak_gib": max(r["peak"] for r in ranks) / GIB,
        "step_gib": max(r["peak"] - r["before"] for r in ranks) / GIB,
    }


def fit(points) -> tuple[float, float]:
    """Least squares peak = a + b * seq."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--memory-seq", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--long", type=int, nargs="+", default=[16384, 32768, 65536], help="chunked-loss runs")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--budget-gib", type=float, default=8.0)
    parser.add_argument("--out", default="bench/results/model.json")
    args = parser.parse_args()
    p = args.world
    report = {"world": p, "seq": args.seq}

    unpatched = measure(args.seq, False, p)
    patched = measure(args.seq, True, p)
    report["step"] = {"unpatched": unpatched, "patched": patched}
    time_ratio = patched["seconds"] / unpatched["seconds"]
    mem_ratio = patched["peak_gib"] / unpatched["peak_gib"]
    print(
        f"S={args.seq}: unpatched {unpatched['seconds']:.1f}s peak {unpatched['peak_gib']:.2f} GiB (1 process, {p} threads)"
    )
    print(f"          patched   {patched['seconds']:.1f}s peak {patched['peak_gib']:.2f} GiB per rank ({p} processes)")
    print(f"          time ratio {time_ratio:.3f}; peak memory per rank {mem_ratio:.3f} of unpatched")
    report.update(time_ratio=time_ratio, memory_ratio=mem_ratio)
    verdicts = Verdicts()
    verdicts.check("model.time_ratio", time_ratio, f"S={args.seq}")
    verdicts.check("model.memory_ratio", mem_ratio, f"S={args.seq}")
    sys.stdout.flush()

    curves = {"unpatched": [(args.seq, unpatched["peak_gib"])], "patched": [(args.seq, patched["peak_gib"])]}
    for seq in args.memory_seq:
        for name, is_patched in (("unpatched", False), ("patched", True)):
            curves[name].append((seq, measure(seq, is_patched, p)["peak_gib"]))
    report["memory_points_gib"] = curves
    budget = {}
    for name, points in curves.items():
        a, b = fit(points)
        budget[name] = (args.budget_gib - a) / b
        print(
            f"peak RSS {name:<9} ~ {a:.2f} GiB + {b * 1024 * GIB / GIB:.3f} GiB per 1K tokens "
            f"-> longest S under {args.budget_gib:g} GiB: {budget[name] / 1024:.1f}K"
        )
    report["longest_under_budget"] = budget
    print(f"          longest sequence grows {budget['patched'] / budget['unpatched']:.2f}x with P={p}")
    sys.stdout.flush()

    long_points = []
    for seq in args.long:
        run = measure(seq, True, p, chunked=True)
        long_points.append((seq, run["peak_gib"], run["step_gib"], run["seconds"]))
        print(
            f"patched + causal_lm_loss S={seq // 1024}K: peak {run['peak_gib']:.2f} GiB per rank, "
            f"step adds {run['step_gib']:.2f} GiB, {run['seconds']:.0f}s"
        )
        sys.stdout.flush()
    report["chunked_long"] = long_points
    if len(long_points) >= 2:
        (s0, _, d0, _), (s1, _, d1, _) = long_points[-2], long_points[-1]
        print(
            f"          step memory x{d1 / d0:.2f} for S x{s1 / s0:.1f} (linear: x{s1 / s0:.1f}; quadratic: x{(s1 / s0) ** 2:.1f})"
        )

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return verdicts.exit_code()


if __name__ == "__main__":
    sys.exit(main())
