"""A few DeepSpeed steps of a tiny Llama on a dp x sp x tp grid built from a recipe.

    torchrun --nproc_per_node 4 tests/scripts/grid_train.py --sp 2 --tp 2 --zero 1 --losses out.txt

Used by tests/test_grid.py: every grid must reproduce the single-process losses."""

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

import ringpatch  # noqa: E402
from ringpatch.parallel import build_mesh  # noqa: E402
from ringpatch.train import checkpoint  # noqa: E402
from ringpatch.train.ds_config import deepspeed_config  # noqa: E402
from ringpatch.train.export import export_hf  # noqa: E402
from ringpatch.train.recipe import Recipe, from_dict  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sp", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--zero", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--losses", required=True)
    parser.add_argument("--run-dir", help="checkpoint every step here and resume from its latest checkpoint")
    parser.add_argument("--stop-after", type=int, help="exit after this many steps, as if killed")
    parser.add_argument("--model-name", default="tiny", help="the recipe's model name (its identity)")
    parser.add_argument("--export", help="export the trained model here and save its logits beside it")
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    recipe = from_dict(
        Recipe,
        {
            "model": {"name": args.model_name},
            "parallel": {"sp": args.sp, "tp": args.tp},
            "zero": {"stage": args.zero},
            "optim": {"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.01},  # torch's AdamW defaults
            "stages": [{"seq_len": 256, "steps": args.steps}],
        },
    )
    dims = recipe.parallel.dims(dist.get_world_size())
    mesh = build_mesh(dims)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    dims.check_heads(config.num_attention_heads, config.num_key_value_heads)
    model = ringpatch.patch_model(AutoModelForCausalLM.from_config(config), group=mesh.sp_group)
    ds = deepspeed_config(recipe, bf16=False)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    record = checkpoint.recipe_record(recipe, dims.world)
    start, losses = 0, []
    if args.run_dir:
        state, _ = checkpoint.resume(engine, args.run_dir, record)
        start, losses = state["step"], state.get("losses", [])
    for step in range(start, args.steps):
        if step == args.stop_after:
            break
        # the sample of step s is fixed by s, as a resumed sampler would give it
        ids = torch.randint(0, 256, (1, recipe.stages[0].seq_len), generator=torch.Generator().manual_seed(step))
        loss = engine(**ringpatch.shard_batch({"input_ids": ids, "labels": ids}, group=mesh.sp_group)).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if args.run_dir:
            checkpoint.save(engine, args.run_dir, step + 1, record, {"losses": losses})
    if dist.get_rank() == 0:
        Path(args.losses).write_text(" ".join(repr(x) for x in losses))
    if args.export:
        export_hf(engine, args.export)
        probe = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(99))
        with torch.no_grad():
            local = engine(**ringpatch.shard_batch({"input_ids": probe}, group=mesh.sp_group)).logits
        logits = ringpatch.unshard(local, group=mesh.sp_group, dim=1)
        if dist.get_rank() == 0:
            torch.save({"input_ids": probe, "logits": logits}, Path(args.export).with_suffix(".logits.pt"))
    del engine  # before the groups go: see examples/train_plain.py (pytorch/pytorch#56297)
    dist.barrier()  # leave together
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
