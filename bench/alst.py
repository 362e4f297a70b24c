"""The plan's longest context against ALST's one-node ablation, in ALST's own settings.

    python bench/alst.py

ALST (arXiv 2506.13996) trains Llama-3.1-8B on one node of 8 x H100-80GB with Ulysses 8 and ships
the configs of its ablation (ArcticTraining, projects/sequence-parallelism/run-h100-sp8-llama-8b*.yml):
ZeRO-3 with the optimizer offloaded (DeepSpeed's defaults otherwise), Liger's kernels, and one
feature at a time on top of Ulysses: nothing more 1.1M tokens, tiled MLP 1.2M, checkpoint offload
2.4M, both 3.8M (their max_length). Each row here is recipes/llama3-8b-1m-1node.yaml set to those
settings (Ulysses 8, zero.offload: optimizer, no DeepSpeed file, `rmsnorm: chunked` as the nearest
to Liger's RMSNorm, 32 MLP tiles where ALST tiles) and `ringpatch plan --max-context --gpu-memory 79`
(1536 GiB of host memory per node).
Under Ulysses 8 alone each rank's attention holds the whole sequence with 4 of the 32 query heads,
so one kernel call takes sequence x 4 x 128 elements and the plan stops at the 2^31 where the GPU
kernels index with 32-bit integers: 4,194,296 tokens. ALST's stack had the same edge
(linkedin/Liger-Kernel#803, filed by ALST's authors after the paper: Liger's RMSNorm and flash-attn 2
fail once a rank's [1, 500_000, 4096] "tensor of about 2^31" is passed).
Reported, not held to a target: the plan does not model the tiled rows' difference
(docs/measurements.md, "ALST's one-node rows").
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HOST_GIB_PER_NODE = 1.9e12 / 2**30  # ALST's nodes: "1.9TB CPU memory" (ArcticTraining's README)

ROWS = (  # ALST's config, its switches here, its max_length
    ("no-mlp-no-act-offload", {"activation_offload": False, "mlp_tiles": 1}, 1_100_000),
    ("yes-mlp", {"activation_offload": False, "mlp_tiles": 32}, 1_200_000),
    ("yes-act-offload", {"activation_offload": True, "mlp_tiles": 1}, 2_400_000),
    ("all (run-h100-sp8-llama-8b)", {"activation_offload": True, "mlp_tiles": 32}, 3_800_000),
)


def alst_recipe(switches: dict) -> dict:
    """The one-node recipe in ALST's settings, with `switches`."""
    recipe = yaml.safe_load((ROOT / "recipes" / "llama3-8b-1m-1node.yaml").read_text())
    recipe["model"]["name"] = "meta-llama/Llama-3.1-8B"
    recipe["parallel"] = {"sp": 8, "ulysses": 8, "tp": 1, "layout": "contiguous"}
    recipe["zero"] = {"stage": 3, "offload": "optimizer"}
    recipe.pop("deepspeed")  # DeepSpeed's ZeRO defaults, as ALST's configs
    recipe["stages"] = [{"seq_len": 1_048_576, "steps": 1}]
    return recipe | {"rmsnorm": "chunked"} | switches


def rows() -> list[tuple[str, int, int, str]]:
    """Each ALST row: its config, ALST's length, the plan's, and what stops the next length."""
    from ringpatch.plan import for_recipe
    from ringpatch.plan.budget import limit_of

    found = []
    with tempfile.TemporaryDirectory() as folder:
        for name, switches, alst in ROWS:
            path = Path(folder, f"{name.split()[0]}.yaml")
            path.write_text(yaml.safe_dump(alst_recipe(switches)))
            plan = for_recipe(str(path), nodes=1)
            context = plan.max_context(79, host_gib_per_gpu=HOST_GIB_PER_NODE / 8)
            largest = max(context.budget.items, key=context.budget.items.get)
            beyond = limit_of(plan, context.seq_len + plan.dims.seq_len_divisor, 79, HOST_GIB_PER_NODE / 8)
            stop = f"{beyond}; largest item {largest} {context.budget.items[largest]:.1f} GiB"
            found.append((name, alst, context.seq_len, stop))
    return found


def main() -> int:
    print(f"{'ALST config':<30} {'ALST':>10} {'plan':>11} {'plan/ALST':>9}  what stops the next length")
    for name, alst, planned, stop in rows():
        print(f"{name:<30} {alst:>10,} {planned:>11,} {planned / alst:>9.3f}  {stop}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
