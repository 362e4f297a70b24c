"""Ring attention with FSDP2 (torch.distributed.fsdp.fully_shard) in your own training loop.

    torchrun --nproc_per_node 2 examples/train_fsdp2.py        # CPU (gloo) or GPUs (nccl)

FSDP2 shards the parameters, gradients and optimizer states over the ranks; ringpatch splits
each sequence over the same ranks. Every rank loads the same full-length batch and shard_batch
keeps this rank's part; the loss on every rank is the full-sequence loss, and FSDP2's gradient
reduce-scatter (an average over the ranks) gives the unpatched model's gradients, as DDP's
all-reduce does in examples/train_plain.py. A tiny Llama is built from a config so nothing
downloads: put AutoModelForCausalLM.from_pretrained(...) there for a real model.
"""

import argparse

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
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
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    sp_group = dist.new_group()  # ring traffic on its own group, FSDP2's collectives on the default one
    model = tiny_llama()
    if torch.cuda.is_available():
        model = model.cuda()
    for layer in model.model.layers:
        fully_shard(layer)  # each decoder layer gathered for its forward and backward, resharded after
    fully_shard(model)  # the rest (embeddings, final norm, head)
    model = ringpatch.patch_model(model, group=sp_group)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # after fully_shard: over the shards
    losses = []
    for batch in batches(args.steps, args.seq_len):
        batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
        loss = model(**ringpatch.shard_batch(batch, group=sp_group)).loss  # full-sequence loss
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
    del model, optimizer  # before the groups go (pytorch/pytorch#56297)
    dist.barrier()  # leave together
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
