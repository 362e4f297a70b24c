"""Exactness on real weights, as figures: what tests/hf/test_real_model.py asserts, printed.

SmolLM2-135M-Instruct (`make real-model`) on 2,048 tokens of Python's documentation, patched over 2
gloo ranks against the unpatched model in one process: the float32 loss's relative error and the
largest gradient error (relative to each parameter's largest gradient); the bfloat16 ring's errors
against float32 beside the unpatched bfloat16 model's; and at three real layers, the ring's bf16
attention against float64 beside monolithic bf16 attention's (RMS errors). The bounds the test
holds them to: loss 1e-5, gradients 1e-4, bf16 no worse than monolithic.

    python bench/real_exact.py          # about 2 minutes on 2 cores
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _ranks(rank, world, folder, path, out):
    import torch
    import torch.nn.functional as F

    import ringpatch
    import tests.hf.test_real_model as T
    from tests.helpers.reference import attention, rms_err

    ref = torch.load(path)
    plain = T._plain(folder)
    loss, grads = T._ring(ringpatch.patch_model(T._load(folder)), plain, "zigzag", world)
    row = {
        "float32_loss_rel": abs(loss.item() - ref["loss"].item()) / ref["loss"].item(),
        "float32_grad_max_rel": max(
            ((grads[n] - w).abs().max() / w.abs().max().clamp_min(1e-12)).item() for n, w in ref["grads"].items()
        ),
        "loss": ref["loss"].item(),
        "decided_positions": int(ref["decided"].sum()),
    }
    loss, grads = T._ring(ringpatch.patch_model(T._load(folder, torch.bfloat16)), plain, "zigzag", world)
    row |= {
        "bf16_ring_loss_rel": abs(loss.item() - ref["loss"].item()) / ref["loss"].item(),
        "bf16_monolithic_loss_rel": ref["bf16"]["loss"],
        "bf16_ring_grad_rel": T._relative(grads, ref["grads"]),
        "bf16_monolithic_grad_rel": ref["bf16"]["grads"],
        "attention": {},
    }
    for layer, (q, k, v) in T._real_qkv(folder).items():
        want = attention(q, k, v)
        mono = F.scaled_dot_product_attention(
            *(x.to(torch.bfloat16).transpose(1, 2) for x in (q, k, v)), is_causal=True, enable_gqa=True
        ).transpose(1, 2)
        got = ringpatch.unshard(ringpatch.ring_attention(*[ringpatch.shard(x.to(torch.bfloat16)) for x in (q, k, v)]))
        row["attention"][layer] = {"ring": rms_err(got, want), "monolithic": rms_err(mono, want)}
    if rank == 0:
        Path(out).write_text(json.dumps(row))


def main() -> int:
    import tests.hf.test_real_model as T
    from tests.helpers.procs import spawn

    class Temporary:  # the fixture's tmp_path_factory
        def mktemp(self, name):
            return Path(tempfile.mkdtemp(prefix=name))

    folder, path = T.references.__wrapped__(Temporary())
    out = Path(tempfile.mkdtemp()) / "row.json"
    spawn(_ranks, 2, folder, path, str(out))
    r = json.loads(out.read_text())
    print(f"SmolLM2-135M-Instruct, {T.TOKENS} tokens of Python's documentation, 2 ranks vs one process:")
    print(f"  float32: loss {r['loss']:.4f} nats, relative error {r['float32_loss_rel']:.1e} (bound 1e-5); largest "
          f"gradient error {r['float32_grad_max_rel']:.1e} of its parameter's largest gradient (bound 1e-4)")  # fmt: skip
    print(f"  greedy next tokens: compared at {r['decided_positions']} of {T.TOKENS - 1} positions (the rest are "
          f"ties within {T.MARGIN} between the top two logits)")  # fmt: skip
    print(f"  bfloat16 against float32: loss {r['bf16_ring_loss_rel']:.2e} ring, {r['bf16_monolithic_loss_rel']:.2e} "
          f"unpatched; gradients {r['bf16_ring_grad_rel']:.4f} ring, {r['bf16_monolithic_grad_rel']:.4f} unpatched")  # fmt: skip
    for layer, e in r["attention"].items():
        print(f"  layer {layer} attention, bf16 vs float64: ring {e['ring']:.3e}, monolithic {e['monolithic']:.3e} rms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
