"""Check ring attention on this machine's ranks against one-process attention.

    torchrun --nproc_per_node 2 -m ringpatch.selfcheck            # CPU: gloo (make selfcheck)
    torchrun --nproc_per_node 2 -m ringpatch.selfcheck --seq 65536  # two GPUs: nccl (make selfcheck NPROC=2)

Every rank builds the same full sequence, keeps its part, and runs ring attention forward and
backward over the group's real exchanges (NCCL on GPUs); rank 0 gathers the output and the
gradients of q, k and v and compares them with attention over the full sequence in float64 in one
process. Cases: one sequence; packed documents that straddle the ranks; the K/V heads in groups of
one (the ring runs once per head group); and, on 4 or more ranks, Ulysses 2 x ring. Exits
non-zero if any case misses its tolerance.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ringpatch
from ringpatch.attention import ring
from ringpatch.attention.layout import DEFAULT_LAYOUT, LAYOUTS
from ringpatch.flags import Parser
from ringpatch.parallel import leave, start, stop

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
"""Largest |error| / largest |reference| of the output and of each gradient."""


def _full_attention(q, k, v, window, doc_ids=None):
    """One-process reference in float64 with an explicit mask. # (B, S, H, D)"""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    seq = q.shape[2]
    i, j = torch.arange(seq, device=q.device)[:, None], torch.arange(seq, device=q.device)[None, :]
    mask = (j <= i) & (j > i - window) if window else j <= i
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None] == doc_ids[None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)


def _documents(seq: int, world: int) -> list[int]:
    """cu_seqlens of a row of uneven documents, the longest straddling every rank's part."""
    cuts = sorted({seq // (3 * world), seq // 2 + 1, seq // 2 + 3, seq - seq // (2 * world)} - {0, seq})
    return [0, *cuts, seq]


def check(case: str, args, device, dtype, group=None, cu_seqlens=None) -> bool:
    """One case: the ring's output and gradients against float64 attention over the whole sequence."""
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    shapes = [(1, args.seq, h, args.head_dim) for h in (args.heads, args.kv_heads, args.kv_heads)]
    full = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    dout = torch.randn(shapes[0], generator=g, dtype=torch.float64)
    place = {"group": group, "layout": args.layout, "cu_seqlens": cu_seqlens}
    q, k, v = (ringpatch.shard(x.to(device, dtype), **place).requires_grad_() for x in full)
    dist.barrier()
    began = time.perf_counter()
    out = ringpatch.ring_attention(q, k, v, group=group, window=args.window, layout=args.layout, cu_seqlens=cu_seqlens)
    out.backward(ringpatch.shard(dout.to(device, dtype), **place))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    got = [ringpatch.unshard(x.detach(), **place).double().cpu() for x in (out, q.grad, k.grad, v.grad)]
    ok = True
    if rank == 0:
        doc_ids = None
        if cu_seqlens is not None:
            doc_ids = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), torch.tensor(cu_seqlens).diff())
        ref_in = [x.clone().requires_grad_() for x in full]
        ref = _full_attention(*ref_in, args.window, doc_ids)
        ref.backward(dout)
        want = [ref.detach()] + [x.grad for x in ref_in]
        errors = {
            name: ((a - b).abs().max() / b.abs().max()).item()
            for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True)
        }
        ok = max(errors.values()) <= TOLERANCE[dtype]
        figures = " ".join(f"{name} {e:.1e}" for name, e in errors.items())
        print(f"  {'ok    ' if ok else 'FAILED'} {case:<34} {seconds:6.2f} s  relative error {figures}")
    agreed = torch.tensor([ok], dtype=torch.int32, device=device)
    dist.broadcast(agreed, 0)
    return bool(agreed.item())


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
    world = dist.get_world_size()
    if dist.get_rank() == 0:
        print(
            f"ring attention over {world} rank(s) ({device.type}, {dtype}, layout {args.layout}): S={args.seq} heads "
            f"{args.heads}/{args.kv_heads} x {args.head_dim}, window {args.window}; forward + backward against "
            f"one-process float64 attention (tolerance {TOLERANCE[dtype]:.0e})"
        )
    results = [check("one sequence", args, device, dtype)]
    results.append(check("packed documents", args, device, dtype, cu_seqlens=_documents(args.seq, world)))
    with mock.patch.object(ring, "GROUP_BYTES", 1):  # every K/V head its own pass of the ring
        results.append(check("K/V head groups in turn", args, device, dtype))
    if world >= 4 and world % 2 == 0 and args.heads % 2 == 0:
        results.append(
            check(f"Ulysses 2 x ring {world // 2}", args, device, dtype, group=ringpatch.ulysses_ring_group(2))
        )
    stop()
    if not all(results):
        print(f"selfcheck: {results.count(False)} of {len(results)} cases missed the tolerance", file=sys.stderr)
    return 0 if all(results) else 1


if __name__ == "__main__":
    leave(main())  # no interpreter finalization after gloo's last collective (ringpatch.parallel.leave)
