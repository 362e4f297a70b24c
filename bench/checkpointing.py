"""Attention-aware checkpointing (recipe keep_attention) against full-layer checkpointing.

The bench's Llama-shaped model (bench/model.py: hidden 256, 4 layers, 8 heads, 2 kv heads),
ring-patched on P = 2 processes x 1 thread (gloo), activation checkpointing on (non-reentrant),
the chunked loss. Full-layer checkpointing runs each layer's ring forward twice (forward, and the
recompute in backward); with keep_attention the recompute takes the kept output instead. The two
configurations alternate within one process group, one warm-up step each, then `--reps` timed
steps each; a step ends when its slowest rank does; the best step of each is compared.
Target (issue: memory): keep / full <= 0.85 at S = 32K.

    python bench/checkpointing.py                     # S = 16K and 32K
    python bench/checkpointing.py --seq 4096 --reps 1 # quick look
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ringpatch  # noqa: E402
from bench.model import build_model  # noqa: E402
from bench.targets import Verdicts  # noqa: E402


def _batch(seq: int) -> dict:
    ids = torch.randint(0, 32000, (1, seq), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def _step(model, local) -> float:
    dist.barrier()
    start = time.perf_counter()
    loss = ringpatch.causal_lm_loss(model, local)
    loss.backward()
    model.zero_grad(set_to_none=True)
    t = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _worker(rank, world, store, seqs, reps, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    models = {}
    for keep in (False, True):
        model = build_model()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        models[keep] = ringpatch.patch_model(model, keep_attention=keep)
    rows = []
    for seq in seqs:
        local = ringpatch.shard_batch(_batch(seq))
        warm = ringpatch.shard_batch(_batch(1024))
        times = {False: [], True: []}
        for keep in (False, True):
            _step(models[keep], warm)
        for _ in range(reps):
            for keep in (False, True):
                times[keep].append(_step(models[keep], local))
        full, kept = min(times[False]), min(times[True])
        rows.append({"seq": seq, "full_s": times[False], "keep_s": times[True], "ratio": kept / full})
        if rank == 0:
            print(f"S={seq:>6}  full-layer {full:7.2f}s  keep_attention {kept:7.2f}s  ratio {kept / full:.3f}")
            sys.stdout.flush()
    if rank == 0:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "world": world, "reps": reps}
        Path(out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {out}")
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default="bench/results/checkpointing.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(
            _worker, args=(args.world, os.path.join(tmp, "store"), args.seq, args.reps, args.out), nprocs=args.world
        )
    verdicts = Verdicts()
    longest = max(json.loads(Path(args.out).read_text())["rows"], key=lambda r: r["seq"])
    if longest["seq"] >= 32768:  # the target's length; a quick look at shorter ones holds it to nothing
        verdicts.check("checkpointing.keep_vs_full", longest["ratio"], f"S={longest['seq']}")
    return verdicts.exit_code()


if __name__ == "__main__":
    sys.exit(main())
