"""The recipe trainer: ring attention over sp, DeepSpeed ZeRO and AutoTP, stages that extend the context.

    torchrun --nproc_per_node 2 -m ringpatch.train --recipe recipes/tiny-cpu.yaml
    deepspeed --num_gpus 8 -m ringpatch.train --recipe recipes/llama3-8b-256k-1node.yaml
    accelerate launch --config_file launch/accelerate/1node-8gpu.yaml -m ringpatch.train --recipe ...

Every check that needs no process group runs first (ringpatch.preflight). Then: the dp x sp x tp
grid, the model (patched for the ring, wrapped so its loss is the chunked cross-entropy), the
DeepSpeed engine, and for each stage its RoPE, its prepared data and its steps. A checkpoint
every save_every steps and at each stage end; re-running the same command resumes from the
latest complete one. The end is a Hugging Face folder, run_dir/final, that needs no ringpatch.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch


def schedule(recipe):
    """lr(step) / optim.lr for every optimizer step: per stage, linear warm-up then cosine
    decay to min_lr_ratio of the stage's peak."""
    bounds, start = [], 0
    for stage in recipe.stages:
        bounds.append((start, start + stage.steps, (stage.lr or recipe.optim.lr) / recipe.optim.lr))
        start += stage.steps

    def factor(step: int) -> float:
        first, end, peak = next((b for b in bounds if step < b[1]), bounds[-1])
        warm = recipe.optim.warmup_steps
        t = step - first
        if t < warm:
            return peak * (t + 1) / warm
        progress = min(1.0, (t - warm) / max(1, end - first - warm))
        floor = recipe.optim.min_lr_ratio
        return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    return factor


class LossModel(torch.nn.Module):
    """The causal LM whose forward is the chunked cross-entropy of shard_batch's output, so
    DeepSpeed (and ZeRO-3's parameter hooks) see the whole loss, head included, in one forward."""

    def __init__(self, lm, chunk_tokens: int = 4096):
        super().__init__()
        self.lm = lm
        self.config = lm.config  # AutoTP reads the architecture from here
        self.chunk_tokens = chunk_tokens

    def forward(self, **batch):
        from ringpatch.loss import causal_lm_loss

        return causal_lm_loss(self.lm, batch, chunk_tokens=self.chunk_tokens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ringpatch train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="a recipe YAML (recipes/)")
    parser.add_argument("--run-dir", help="override the recipe's run_dir")
    parser.add_argument(
        "--deepspeed", help="a DeepSpeed JSON of tuning knobs (launch/deepspeed/); overrides the recipe's"
    )
    parser.add_argument("--no-resume", action="store_true", help="refuse to start when run_dir holds a checkpoint")
    parser.add_argument("--max-steps", type=int, help="stop after this global step (a partial run that resumes later)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = parser.parse_args(argv)

    from ringpatch.preflight import USER_ERRORS, preflight
    from ringpatch.trainer import Trainer

    try:
        plan = preflight(args.recipe, run_dir=args.run_dir, deepspeed_file=args.deepspeed)
    except USER_ERRORS as e:  # before any process group: a plain message and exit 2
        print(f"ringpatch train: {e}", file=sys.stderr)
        return 2
    try:
        Trainer(plan).run(resume=not args.no_resume, max_steps=args.max_steps)
    except USER_ERRORS as e:
        # inside the process groups: leave at once, since a rank that waits for its peers to
        # tear down could hang; the launcher stops the other ranks
        print(f"ringpatch train (rank {os.environ.get('RANK', '0')}): {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
