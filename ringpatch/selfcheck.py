"""Check ring attention on this machine's ranks against one-process attention.

    torchrun --nproc_per_node 2 -m ringpatch.selfcheck            # CPU: gloo
    torchrun --nproc_per_node 8 -m ringpatch.selfcheck --seq 65536  # GPUs: nccl

Every rank builds the same full sequence, keeps its part, and runs ring attention forward
and backward; rank 0 gathers the result and compares it with attention over the full
sequence computed in one process. Exits non-zero if a tolerance is missed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ringpatch
from ringpatch.attention.layout import DEFAULT_LAYOUT, LAYOUTS
from ringpatch.flags import Parser
from ringpatch.parallel import start, stop


def _full_attention(q, k, v, window):
    """One-process reference in float64 with an explicit mask. # (B, S, H, D)"""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    seq = q.shape[2]
    i, j = torch.arange(seq, device=q.device)[:, None], torch.arange(seq, device=q.device)[None, :]
    mask = (j <= i) & (j > i - window) if window else j <= i
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)


def main() -> int:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--layout", default=DEFAULT_LAYOUT, choices=list(LAYOUTS))
    args = parser.parse_args()

    device = start()
    cuda = device.type == "cuda"
    if not cuda:  # the machine's cores shared among the ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    dtype = torch.bfloat16 if cuda else torch.float32
    rank, world = dist.get_rank(), dist.get_world_size()

    g = torch.Generator().manual_seed(0)
    shapes = [(1, args.seq, h, args.head_dim) for h in (args.heads, args.kv_heads, args.kv_heads)]
    full = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    q, k, v = (ringpatch.shard(x, layout=args.layout).requires_grad_() for x in full)
    dist.barrier()
    began = time.perf_counter()
    out = ringpatch.ring_attention(q, k, v, window=args.window, layout=args.layout)
    out.float().square().sum().backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    gathered = ringpatch.unshard(out.detach(), layout=args.layout)
    ok = True
    if rank == 0:
        ref = _full_attention(*full, args.window)
        err = ((gathered.double() - ref).abs().max() / ref.abs().max()).item()
        bound = 1e-5 if dtype == torch.float32 else 2e-2
        ok = err <= bound
        print(
            f"ring attention over {world} rank(s) ({device.type}, {dtype}, layout {args.layout}): "
            f"S={args.seq} heads {args.heads}/{args.kv_heads} x {args.head_dim}, window {args.window}\n"
            f"  forward+backward {seconds:.2f}s; output relative error vs one-process attention {err:.2e} "
            f"(bound {bound:.0e}) -> {'ok' if ok else 'FAILED'}"
        )
    stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
