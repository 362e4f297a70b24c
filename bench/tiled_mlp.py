"""The sequence-tiled MLP (recipe mlp_tiles) against the untiled one: step time and peak memory.

The bench's Llama-shaped model (bench/model.py: hidden 256, intermediate 688, 4 layers), patched as a
ring of one process with 2 threads, activation checkpointing on (as the recipes train), the chunked loss.
Each configuration runs in a fresh process: one warm-up step, then the median of `--reps`
timed steps, and the peak RSS above the process's size before its first step. Targets
(issue: memory): step-time overhead <= 10%; the peak falls with the tiles.

    python bench/tiled_mlp.py                       # S = 8K and 16K, tiles 1, 4, 8
    python bench/tiled_mlp.py --seq 4096 --reps 1   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3

sys.path.insert(0, str(ROOT))
from bench.targets import Verdicts  # noqa: E402


def worker(seq: int, tiles: int, reps: int) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    import ringpatch
    from bench.model import _rss_bytes, build_model
    from ringpatch.plan.switches.mlp_tiles import tile_mlps

    torch.set_num_threads(2)
    model = build_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tile_mlps(model, tiles)
    model = ringpatch.patch_model(model)  # a ring of one process, as the trainer runs sp = 1
    model.train()
    ids = torch.randint(0, 32000, (1, seq), generator=torch.Generator().manual_seed(1))
    batch = ringpatch.shard_batch({"input_ids": ids, "labels": ids})
    before = _rss_bytes()
    times = []
    for i in range(reps + 1):
        started = time.perf_counter()
        ringpatch.causal_lm_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"seq": seq, "tiles": tiles, "step_s": statistics.median(times), "peak_gib": peak / GIB}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--tiles", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "tiled_mlp.json"))
    p.add_argument("--worker", nargs=3, type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker)))
        return 0
    rows, verdicts = [], Verdicts()
    print(f"{'S':>6} {'tiles':>5} {'step s':>7} {'x untiled':>9} {'peak GiB':>8} {'x untiled':>9}")
    for seq in a.seq:
        base = None
        for tiles in a.tiles:
            out = subprocess.run([sys.executable, __file__, "--worker", str(seq), str(tiles), str(a.reps)],
                                 capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="2"))  # fmt: skip
            row = json.loads(out.stdout.strip().splitlines()[-1])
            base = base or row
            row["time_ratio"] = row["step_s"] / base["step_s"]
            row["peak_ratio"] = row["peak_gib"] / base["peak_gib"]
            rows.append(row)
            print(f"{seq:>6} {tiles:>5} {row['step_s']:>7.2f} {row['time_ratio']:>9.3f} {row['peak_gib']:>8.3f} "
                  f"{row['peak_ratio']:>9.3f}", flush=True)  # fmt: skip
    for row in rows:
        if row["tiles"] > 1:
            verdicts.check("tiled_mlp.time_ratio", row["time_ratio"], f"S={row['seq']}, {row['tiles']} tiles")
            if row["seq"] == max(a.seq):
                verdicts.check("tiled_mlp.peak_ratio", row["peak_ratio"], f"S={row['seq']}, {row['tiles']} tiles")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    return verdicts.exit_code()


if __name__ == "__main__":
    sys.exit(main())
