"""Ring attention in your own DeepSpeed training loop.

    deepspeed --num_gpus 8 examples/train_deepspeed.py                  # GPUs
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/train_deepspeed.py   # CPU (gloo)

DeepSpeed averages gradients over its data-parallel ranks; here every rank is a
sequence-parallel rank of one sample, which the loss contract makes equivalent.
"""

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, gloo backend

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

import ringpatch  # noqa: E402


def tiny_llama():
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
    return AutoModelForCausalLM.from_config(config)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--losses", help="write the loss of each step here (rank 0)")
    parser.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
    args = parser.parse_args()

    # --- the pattern -------------------------------------------------------------------
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    sp_group = dist.new_group()  # ring traffic on its own group
    model = ringpatch.patch_model(tiny_llama(), group=sp_group)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": args.zero},
        "bf16": {"enabled": torch.cuda.is_available()},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    g = torch.Generator().manual_seed(1)  # every rank loads the same full batch
    losses = []
    for _ in range(args.steps):
        ids = torch.randint(0, 256, (1, args.seq_len), generator=g)
        local = ringpatch.shard_batch({"input_ids": ids, "labels": ids}, group=sp_group)
        loss = engine(**{k: v.to(engine.device) for k, v in local.items()}).loss  # full-sequence loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    # -------------------------------------------------------------------------------------
    if dist.get_rank() == 0:
        print("losses:", " ".join(f"{x:.6f}" for x in losses))
        if args.losses:
            with open(args.losses, "w") as f:
                f.write(" ".join(repr(x) for x in losses))
    del engine  # before the groups go: see examples/train_plain.py (pytorch/pytorch#56297)
    dist.barrier()  # leave together
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
