"""Ring attention in your own PyTorch training loop.

    torchrun --nproc_per_node 2 examples/train_plain.py        # CPU (gloo) or GPUs (nccl)

Every rank loads the same full-length batch; shard_batch keeps this rank's part. The loss
on every rank is the full-sequence loss, and DDP's gradient averaging over the ranks gives
the unpatched model's gradients. A tiny Llama is built from a config so nothing downloads:
put AutoModelForCausalLM.from_pretrained(...) there for a real model.
"""

import argparse

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import AutoModelForCausalLM, LlamaConfig

import ringpatch


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


def batches(steps, seq_len):
    g = torch.Generator().manual_seed(1)  # same seed on every rank: the same full batch
    for _ in range(steps):
        ids = torch.randint(0, 256, (1, seq_len), generator=g)
        yield {"input_ids": ids, "labels": ids}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--losses", help="write the loss of each step here (rank 0)")
    args = parser.parse_args()

    # --- the pattern -------------------------------------------------------------------
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    sp_group = dist.new_group()  # ring traffic on its own group, DDP's all-reduces on the default one
    model = ringpatch.patch_model(tiny_llama(), group=sp_group)
    ddp = DDP(model)  # averages gradients over the ranks
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for batch in batches(args.steps, args.seq_len):
        loss = ddp(**ringpatch.shard_batch(batch, group=sp_group)).loss  # full-sequence loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # -------------------------------------------------------------------------------------
    if dist.get_rank() == 0:
        print("losses:", " ".join(f"{x:.6f}" for x in losses))
        if args.losses:
            with open(args.losses, "w") as f:
                f.write(" ".join(repr(x) for x in losses))
    # Drop DDP before the groups: if its reducer outlives destroy_process_group it becomes the
    # last owner of the gloo group, whose destructor then joins gloo's threads while holding
    # the GIL and can deadlock (pytorch/pytorch#56297).
    del ddp
    dist.barrier()  # leave together
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
