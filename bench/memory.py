"""The planner's memory estimate against measured peaks, and the longest sequence under a budget.

The bench's Llama-shaped model (bench/model.py: hidden 256, intermediate 688, 4 layers, 8 heads,
2 kv heads, vocab 32000, float32), ring-patched over P = 2 processes x 1 thread (gloo), trained
one step (forward, backward, AdamW step) per measurement, with the memory switches of a recipe:

  off        no activation checkpointing, transformers' loss (full logits): the baseline
  chunked    no checkpointing, ringpatch's chunked loss (what the trainer always uses)
  ckpt       + full-layer activation checkpointing
  ckpt-tiles + mlp_tiles: 4
  on         + activation_offload (on a CPU the "host" is the same memory, so it counts in the RSS)
  ckpt-keep  ckpt + keep_attention

Each (configuration, S) runs in fresh processes (a process that ran a longer step keeps freed
heap resident, which hides part of the next step's peak). Measured, the larger rank's:
- rss: the resident-set high-water mark above the idle process (after a short warm-up step, so
  the weights, the optimizer state and the libraries are in the idle size; the high-water mark
  is reset just before the step);
- live: the peak of the bytes the step's tensors hold, from the profiler's allocation events
  (the CPU's torch.cuda.max_memory_allocated); rss - live is the C allocator's slack.
Predicted: ringpatch's estimate (ringpatch.plan.estimate, float32, total_gib) of everything but
the weights and the optimizer, plus the host bytes of activation_offload. Printed for each
configuration and S with the ratio to rss, and for the items that one configuration minus
another isolates. Then, from linear fits of the absolute peak, the longest S under `--budget-gib`
per rank with each configuration, and one confirming run of the features-on configuration at
twice the baseline's longest S. The chunked loss uses `--loss-chunk` tokens (256: at the recipes'
4096 a chunk's 3 x 4096 x 32000 float32 tensors, 1.5 GiB, outweigh every layer item of this
small model, and the peak would show nothing else).
Targets (issue: memory): predicted within +-20% of measured everywhere; longest S with the
features on >= 2x the baseline's.

    python bench/memory.py                                 # S = 8K, 16K, 32K; confirm at 2x
    python bench/memory.py --seq 4096 8192 --no-confirm    # quick look (about 3 minutes)
    python bench/memory.py --from bench/results/memory.json --no-confirm  # the stored runs, re-predicted
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.targets import Verdicts  # noqa: E402

GIB = 1024**3

SWITCHES = {
    "off": dict(activation_checkpointing=False, chunked=False),
    "chunked": dict(activation_checkpointing=False),
    "ckpt": dict(),
    "ckpt-tiles": dict(mlp_tiles=4),
    "on": dict(mlp_tiles=4, activation_offload=True),
    "ckpt-keep": dict(keep_attention=True),
}
# item isolated by (configuration, minus configuration): the estimate's items that differ
ISOLATED = {
    "checkpointing (chunked - ckpt)": ("chunked", "ckpt"),
    "tiled MLP (ckpt - ckpt-tiles)": ("ckpt", "ckpt-tiles"),
    "kept attention (ckpt-keep - ckpt)": ("ckpt-keep", "ckpt"),
}


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def recipe_for(name: str, seq: int, world: int, loss_chunk: int):
    """The recipe a trainer would run for configuration `name` (None for the baseline)."""
    from ringpatch.plan.recipe import Recipe, from_dict

    if not SWITCHES[name].get("chunked", True):
        return None
    switches = {k: v for k, v in SWITCHES[name].items() if k != "chunked"}
    spec = {"model": {"name": "bench"}, "parallel": {"sp": world, "layout": "zigzag"}, "zero": {"stage": 0},
            "stages": [{"seq_len": seq, "steps": 1}], "loss_chunk_tokens": loss_chunk, **switches}  # fmt: skip
    return from_dict(Recipe, spec)


def predicted_gib(name: str, seq: int, world: int, cfg: dict, loss_chunk: int) -> dict | None:
    """The estimate's items (GiB per rank) the step adds above the idle process, float32."""
    from ringpatch.plan.budget import estimate, host_offload_gib
    from ringpatch.plan.items import Item

    recipe = recipe_for(name, seq, world, loss_chunk)
    if recipe is None:
        return None
    items = estimate(recipe, cfg, world, seq, 1, bf16=False)
    items = {k: v for k, v in items.items() if k not in (Item.WEIGHTS, Item.OPTIMIZER)}
    host = host_offload_gib(recipe, cfg, seq, 1, bf16=False)
    if host:
        items[Item.OFFLOADED] = host  # held through the step, as the weights
    return items


def _train_step(name: str, seq: int, warm: int, loss_chunk: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import ringpatch
    from bench.model import _batch, build_model
    from ringpatch.memory.offload import enable_checkpointing
    from ringpatch.plan.switches.mlp_tiles import tile_mlps
    from ringpatch.plan.tracker import live_peak

    sw = dict(SWITCHES[name])
    chunked = sw.pop("chunked", True)
    model = build_model()
    if sw.get("activation_checkpointing", True):
        enable_checkpointing(model, offload=sw.get("activation_offload", False))
    tile_mlps(model, sw.get("mlp_tiles", 1))
    model.train()
    ringpatch.patch_model(model, keep_attention=sw.get("keep_attention", False))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)

    def step(s: int) -> None:
        local = ringpatch.shard_batch(_batch(s))
        loss = ringpatch.causal_lm_loss(model, local, loss_chunk) if chunked else model(**local).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    step(warm)
    gc.collect()
    idle = _kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark (VmHWM) to the current size
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(seq)
    seconds = time.perf_counter() - start
    peak = _kib("VmHWM")
    return {"idle": idle, "peak": peak, "live": live_peak(prof), "seconds": seconds}


def _worker(rank, world, store, name, seq, warm, loss_chunk, release, out_dir):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    from ringpatch.parallel.process import release_freed_host_memory

    if release:
        release_freed_host_memory()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    row = _train_step(name, seq, warm, loss_chunk)
    Path(out_dir, f"{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def measure(name: str, seq: int, world: int = 2, loss_chunk: int = 256, release: bool = True, warm: int = 1024) -> dict:
    """One step of configuration `name` at `seq` in fresh processes: the larger rank's peak RSS
    above idle ("step_gib"), absolute ("peak_gib"), its live-tensor peak ("live_gib") and the
    slower rank's seconds. release: glibc gives freed tensors back, as the trainer sets it on
    CPU (ringpatch.parallel.process.release_freed_host_memory); False: glibc's defaults."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        args = (world, os.path.join(tmp, "store"), name, seq, warm, loss_chunk, release, tmp)
        mp.spawn(_worker, args=args, nprocs=world)
        ranks = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(world)]
    live = [r["live"] for r in ranks]
    return {
        "name": name,
        "seq": seq,
        "step_gib": max(r["peak"] - r["idle"] for r in ranks) / GIB,
        "peak_gib": max(r["peak"] for r in ranks) / GIB,
        "live_gib": None if None in live else max(live) / GIB,
        "seconds": max(r["seconds"] for r in ranks),
    }


def bench_config() -> dict:
    from bench.model import build_model

    return build_model().config.to_dict()


def _predict(row: dict, world: int, cfg: dict, loss_chunk: int) -> None:
    from ringpatch.plan.estimate import total_gib

    items = predicted_gib(row["name"], row["seq"], world, cfg, loss_chunk)
    row["items"] = items
    row["predicted_gib"] = None if items is None else total_gib(items)


def _print_row(row: dict) -> None:
    pred, live = row["predicted_gib"], row["live_gib"]
    cols = ("-", "-", "-") if pred is None else (
        f"{pred:.2f}", f"{pred / row['step_gib']:.3f}", f"{pred / live:.3f}" if live else "-")  # fmt: skip
    print(f"{row['name']:<11} {row['seq']:>7} {row['step_gib']:6.2f} {live or float('nan'):6.2f} {cols[0]:>9} "
          f"{cols[1]:>6} {cols[2]:>6} {row['peak_gib']:6.2f} {row['seconds']:5.0f}s")  # fmt: skip
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--configs", nargs="+", default=list(SWITCHES), choices=list(SWITCHES))
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--budget-gib", type=float, default=8.0)
    parser.add_argument("--loss-chunk", type=int, default=256, help="tokens per chunk of the chunked loss")
    parser.add_argument("--no-confirm", action="store_true", help="skip the run at twice the baseline's longest S")
    parser.add_argument("--out", default="bench/results/memory.json")
    parser.add_argument(
        "--from",
        dest="stored",
        metavar="JSON",
        help="no grid runs: this bench's stored measurements against the current estimate (then the confirming "
        "run unless --no-confirm)",
    )
    args = parser.parse_args()
    from bench.model import fit
    from ringpatch.parallel.dims import ParallelDims
    from ringpatch.plan.estimate import total_gib

    cfg = bench_config()
    if args.stored:
        report = json.loads(Path(args.stored).read_text())
        rows, world, loss_chunk = report["rows"], report["world"], report["loss_chunk"]
    else:
        report, rows, world, loss_chunk = None, [], args.world, args.loss_chunk
    print(f"GiB per rank ({world} ranks, loss chunk {loss_chunk} tokens); rss and live: what the step adds above")
    print("the idle process; predicted: the estimate of the same; peak: absolute rss")
    print(
        f"{'config':<11} {'S':>7} {'rss':>6} {'live':>6} {'predicted':>9} {'/rss':>6} {'/live':>6} {'peak':>6} {'time':>6}"
    )
    if report is None:
        for name in args.configs:
            for seq in args.seq:
                row = measure(name, seq, world, loss_chunk)
                _predict(row, world, cfg, loss_chunk)
                _print_row(row)
                rows.append(row)
        report = {"world": world, "budget_gib": args.budget_gib, "loss_chunk": loss_chunk, "rows": rows}
    else:
        for row in rows:
            _predict(row, world, cfg, loss_chunk)
            _print_row(row)

    by = {(r["name"], r["seq"]): r for r in rows}
    seqs = sorted({r["seq"] for r in rows})
    print("items isolated by difference (GiB per rank): measured (rss), predicted")
    isolated = []
    for label, (a, b) in ISOLATED.items():
        for s in seqs:
            if (a, s) in by and (b, s) in by:
                meas = by[(a, s)]["step_gib"] - by[(b, s)]["step_gib"]
                pred = by[(a, s)]["predicted_gib"] - by[(b, s)]["predicted_gib"]
                isolated.append({"item": label, "seq": s, "measured_gib": meas, "predicted_gib": pred})
                print(f"  {label:<36} S={s:>6}: {meas:6.3f} {pred:6.3f}")
    report["isolated"] = isolated

    ratios = [r["predicted_gib"] / r["step_gib"] for r in rows if r["predicted_gib"] is not None]
    lives = [r["predicted_gib"] / r["live_gib"] for r in rows if r["predicted_gib"] is not None and r["live_gib"]]
    verdicts = Verdicts()
    for r in rows:
        if r["predicted_gib"] is not None:
            verdicts.check(
                "memory.predicted_vs_measured", r["predicted_gib"] / r["step_gib"], f"{r['name']} S={r['seq']} rss"
            )
            if r["live_gib"]:
                verdicts.check(
                    "memory.predicted_vs_measured", r["predicted_gib"] / r["live_gib"], f"{r['name']} S={r['seq']} live"
                )
    if ratios:
        print(f"predicted / rss: {min(ratios):.3f} .. {max(ratios):.3f}; predicted / live: "
              f"{min(lives, default=float('nan')):.3f} .. {max(lives, default=float('nan')):.3f}")  # fmt: skip
    longest = {}
    for name in dict.fromkeys(r["name"] for r in rows):
        points = [(r["seq"], r["peak_gib"]) for r in rows if r["name"] == name]
        if len(points) >= 2:
            a, b = fit(points)
            longest[name] = (report["budget_gib"] - a) / b
            print(f"peak RSS {name:<11} ~ {a:.2f} GiB + {b * 1024:.4f} GiB per 1K tokens -> longest S under "
                  f"{report['budget_gib']:g} GiB: {longest[name] / 1024:.1f}K (linear fit of {len(points)} points)")  # fmt: skip
    report["longest_fit"] = longest
    if "off" in longest and "on" in longest:
        print(f"longest S by the fits, features on / off: {longest['on'] / longest['off']:.2f}x")
        verdicts.check("memory.longest_on_vs_off", longest["on"] / longest["off"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    if "off" in longest and not args.no_confirm:
        seq = ParallelDims(world=world, sp=world, layout="zigzag").round_up(int(2 * longest["off"]))
        run = measure("on", seq, world, loss_chunk)
        run["predicted_gib"] = total_gib(predicted_gib("on", seq, world, cfg, loss_chunk))
        report["confirm"] = run
        verdict = "under" if run["peak_gib"] <= report["budget_gib"] else "OVER"
        print(f"confirm: 'on' at S={seq} (2 x the baseline's {longest['off'] / 1024:.1f}K): peak {run['peak_gib']:.2f} "
              f"GiB per rank, {verdict} {report['budget_gib']:g} GiB; step adds {run['step_gib']:.2f} (live "
              f"{run['live_gib'] or float('nan'):.2f}), predicted {run['predicted_gib']:.2f} "
              f"({run['predicted_gib'] / run['step_gib']:.3f}); {run['seconds']:.0f}s")  # fmt: skip
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return verdicts.exit_code()


if __name__ == "__main__":
    sys.exit(main())
