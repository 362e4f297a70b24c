"""GPU check (`make gpu-check`): every CUDA backend's block forward/backward against a float64
reference, and the ring's sequential-blocks-plus-merges throughput against monolithic attention.

For each backend: full, causal, windowed and half blocks (the shapes a zigzag ring step
computes) in bfloat16; the errors of out, dq, dk, dv against float64 must be no worse (rms)
than those of monolithic bfloat16 attention. Then one GPU plays all P ranks of a zigzag ring
in turn (every planned block and merge, forward and backward, no communication) at S tokens,
and its time is compared with monolithic fused attention on the same GPU (target: >= 0.90).
Without CUDA it says so and exits 0. `--device cpu` runs the same code on CPU (small sizes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ringpatch.attention.blocks import Call, band_call  # noqa: E402
from ringpatch.attention.kernels import MaskSpec, default_scale, select  # noqa: E402
from ringpatch.attention.layout import local_ranges  # noqa: E402
from ringpatch.attention.merge import merge_  # noqa: E402
from ringpatch.attention.ring import ring_plans  # noqa: E402


def visible(q_pos, k_pos, causal, window):
    """(m, n) bool: query at q_pos[i] sees key at k_pos[j]."""
    i, j = q_pos[:, None], k_pos[None, :]
    vis = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool)
    if causal:
        vis &= j <= i
    if window is not None:
        vis &= j > i - window
    return vis


def reference(q, k, v, mask, scale):
    """float64 attention under `mask`. # q (B, m, H, D)"""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    return torch.einsum("bhij,bjhd->bihd", s.masked_fill(~mask, float("-inf")).softmax(-1), v)


def rms(a, b):
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def block_cases(seq):
    """(name, m, n, call, causal, window): the block shapes the ring plans produce."""
    half = seq // 2
    edge = band_call(seq, seq, 0, seq, 0, 0, True, seq // 2)  # a window edge, trimmed as the planner does
    em, en = edge.q1 - edge.q0, edge.k1 - edge.k0
    return [
        ("full", seq, seq, Call(0, seq, 0, seq, "full", seq, 0), False, None),
        ("causal", seq, seq, Call(0, seq, 0, seq, "causal", 0, 0), True, None),
        ("half-q", half, seq, Call(0, half, 0, seq, "full", 2 * seq, 0), True, None),
        ("half-k", seq, half, Call(0, seq, 0, half, "full", seq, 0), True, None),
        ("window", seq, seq, Call(0, seq, 0, seq, "band", 0, 0), True, seq // 4),
        ("w-edge", em, en, Call(0, em, 0, en, "band", edge.q_pos, edge.k_pos), True, seq // 2),
    ]


def check_block(kernel, name, m, n, call, causal, window, device, dtype, heads, kv_heads, dim):
    g = torch.Generator(device="cpu").manual_seed(0)
    q, dout = (torch.randn(1, m, heads, dim, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, n, kv_heads, dim, generator=g, dtype=torch.float64) for _ in range(2))
    scale = default_scale(dim)
    q_pos = torch.arange(call.q_pos, call.q_pos + m)
    k_pos = torch.arange(call.k_pos, call.k_pos + n)
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    mask = visible(q_pos, k_pos, causal, window)
    ref = reference(*ref_in, mask, scale)
    ref.backward(dout)
    refs = [ref.detach()] + [x.grad for x in ref_in]
    # monolithic bf16: torch's fused attention with the same explicit mask
    mono_in = [x.to(device, dtype).transpose(1, 2).requires_grad_() for x in (q, k, v)]
    mono = F.scaled_dot_product_attention(*mono_in, attn_mask=mask.to(device), enable_gqa=True)
    mono.backward(dout.to(device, dtype).transpose(1, 2))
    monos = [mono.detach().transpose(1, 2)] + [x.grad.transpose(1, 2) for x in mono_in]
    # the backend's block: forward, then backward with its own out/lse (a one-block ring)
    spec = MaskSpec(causal, window, scale)
    qd, kd, vd = (x.to(device, dtype) for x in (q, k, v))
    out, lse = kernel.forward(qd, kd, vd, call, spec)
    dq, dk, dv = kernel.backward(dout.to(device, dtype), qd, kd, vd, out, lse.float(), call, spec)
    rows = {}
    for label, got, mono_t, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), monos, refs, strict=True):
        rows[label] = {"block_rms": rms(got.cpu(), want), "monolithic_rms": rms(mono_t.cpu(), want)}
    ok = all(r["block_rms"] <= r["monolithic_rms"] for r in rows.values())
    return ok, rows


def simulated_ring_seconds(kernel, seq, world, heads, kv_heads, dim, device, dtype):
    """One device runs every rank's planned blocks and merges, forward and backward."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, dout = (torch.randn(1, seq, heads, dim, generator=g).to(device, dtype) for _ in range(2))
    k, v = (torch.randn(1, seq, kv_heads, dim, generator=g).to(device, dtype) for _ in range(2))
    spec = MaskSpec(True, None, default_scale(dim))
    plans = ring_plans("zigzag", seq, world, True, None, kernel.tile)
    idx = [
        torch.cat([torch.arange(s, s + n) for s, n in local_ranges("zigzag", seq, world, r)]).to(device)
        for r in range(world)
    ]
    local = [(q[:, i], k[:, i], v[:, i], dout[:, i]) for i in idx]
    _sync(device)
    start = time.perf_counter()
    for r in range(world):
        ql, _, _, dl = local[r]
        out = torch.zeros(ql.shape, dtype=torch.float32, device=device)
        lse = torch.full(ql.shape[:3], float("-inf"), dtype=torch.float32, device=device)
        for s, calls in enumerate(plans[r]):
            _, kl, vl, _ = local[(r - s) % world]
            for c in calls:
                o, lb = kernel.forward(ql[:, c.q0 : c.q1], kl[:, c.k0 : c.k1], vl[:, c.k0 : c.k1], c, spec)
                merge_(out[:, c.q0 : c.q1], lse[:, c.q0 : c.q1], o, lb)
        out = out.to(dtype)
        dq = torch.zeros(ql.shape, dtype=torch.float32, device=device)
        for s, calls in enumerate(plans[r]):
            _, kl, vl, _ = local[(r - s) % world]
            dkv = torch.zeros((2, *kl.shape), dtype=torch.float32, device=device)
            for c in calls:
                rows, keys = slice(c.q0, c.q1), slice(c.k0, c.k1)
                dq_b, dk_b, dv_b = kernel.backward(
                    dl[:, rows], ql[:, rows], kl[:, keys], vl[:, keys], out[:, rows], lse[:, rows], c, spec
                )
                dq[:, rows] += dq_b
                dkv[0, :, keys] += dk_b
                dkv[1, :, keys] += dv_b
    _sync(device)
    return time.perf_counter() - start


def monolithic_seconds(seq, heads, kv_heads, dim, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, heads, seq, dim, generator=g).to(device, dtype).requires_grad_()
    k, v = (torch.randn(1, kv_heads, seq, dim, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    _sync(device)
    start = time.perf_counter()
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.backward(torch.ones_like(out))
    _sync(device)
    return time.perf_counter() - start


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq", type=int, default=65536, help="tokens for the throughput check")
    parser.add_argument("--block", type=int, default=512, help="tokens per block for the accuracy checks")
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--out", default="bench/results/gpu_check.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; nothing to check (exit 0)")
        return 0
    dtype = torch.bfloat16
    heads, kv_heads, dim = 32, 8, 128
    probe = torch.empty(1, 1, 1, dim, device=device, dtype=dtype)
    kernels = {}
    for name in ("torch", "flash_attn"):
        try:
            kernels[name] = select(name, probe)
        except ValueError as exc:
            print(f"backend {name}: not available ({exc})")
    report, failures = {"device": str(torch.cuda.get_device_name() if device.type == "cuda" else device)}, 0
    for bname, kernel in kernels.items():
        for case in block_cases(args.block):
            ok, rows = check_block(kernel, *case, device, dtype, heads, kv_heads, dim)
            failures += not ok
            report[f"{bname}/{case[0]}"] = rows
            errs = "  ".join(f"{k} {r['block_rms']:.2e}/{r['monolithic_rms']:.2e}" for k, r in rows.items())
            print(f"{'ok  ' if ok else 'FAIL'} {bname:<10} {case[0]:<7} rms block/monolithic: {errs}")
    for bname, kernel in kernels.items():
        simulated_ring_seconds(kernel, args.seq // 8, args.world, heads, kv_heads, dim, device, dtype)  # warm-up
        monolithic_seconds(args.seq // 8, heads, kv_heads, dim, device, dtype)
        ring = min(
            simulated_ring_seconds(kernel, args.seq, args.world, heads, kv_heads, dim, device, dtype) for _ in range(2)
        )
        mono = min(monolithic_seconds(args.seq, heads, kv_heads, dim, device, dtype) for _ in range(2))
        report[f"{bname}/throughput"] = {
            "seq": args.seq,
            "world": args.world,
            "ring_s": ring,
            "monolithic_s": mono,
            "fraction": mono / ring,
        }
        print(
            f"{bname}: S={args.seq} P={args.world} blocks+merges {ring:.3f}s, monolithic {mono:.3f}s, throughput fraction {mono / ring:.3f} (target >= 0.90)"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}; {failures} accuracy failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
