"""The trainer's second engine: FSDP2 (torch.distributed.fsdp.fully_shard), for `engine: fsdp2`.

Fsdp2Engine gives the loop and the checkpoints what they use of DeepSpeed's engine, so the rest
of the trainer is the same for both: calling it runs the loss model; backward() scales the loss
by 1 / grad_accum; step() is called every micro-step and, at the accumulation boundary, clips
the global gradient norm, steps AdamW and the schedule, and clears the gradients;
save_checkpoint / load_checkpoint write and read torch.distributed.checkpoint folders inside the
trainer's tagged checkpoints (manifest, `latest`, resume rules: train/checkpoint.py).

Sharding: every decoder layer (the model's `_no_split_modules` classes) and then the whole loss
model are `fully_shard`ed over the world, so parameters, gradients and AdamW's moments are split
over every rank, as under ZeRO-3; a layer's weights are gathered for its forward and backward
and freed after (reshard_after_forward). Gradients are averaged over the world, as DeepSpeed
averages them: with the ring's loss contract (each rank's loss is the whole sequence's) that is
the unpatched model's gradient over the dp batches. Precision: on a bf16 run the sharded
parameters are float32 (the optimizer's master weights), gathered as bf16 for compute, and
gradients reduced in float32 (MixedPrecisionPolicy); a float32 run is float32 throughout.
zero.offload: cpu keeps the sharded parameters, gradients and optimizer step in host memory
(CPUOffloadPolicy).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from ringpatch.hf.architecture import decoder_layers

STATE_FOLDER = "fsdp2"
"""The torch.distributed.checkpoint folder inside a tagged checkpoint."""
CLIENT_FILE = "client_state.pt"
"""The trainer's state (step, data position) and the schedule's, beside it (rank 0 writes it)."""


class _ClientStateLoader:
    """What checkpoint.load_weights_only replaces: how the client state file is read."""

    @staticmethod
    def load(path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=True)


class Fsdp2Engine:
    def __init__(self, model: torch.nn.Module, recipe, bf16: bool, device: torch.device, factor):
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        self.device, self.grad_accum, self.clip = device, recipe.grad_accum, recipe.optim.grad_clip
        self.export_dtype = next(model.parameters()).dtype
        model.float()  # the shards are the master weights; bf16 copies are gathered for compute
        precision = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None
        )
        # on a CPU run the shards are in host memory already (FSDP2's offload needs an accelerator)
        offload = CPUOffloadPolicy() if recipe.zero.offload == "cpu" and device.type != "cpu" else OffloadPolicy()
        for layer in decoder_layers(model.lm):
            fully_shard(layer, mp_policy=precision, offload_policy=offload)
        fully_shard(model, mp_policy=precision, offload_policy=offload)
        self.module = model
        o = recipe.optim
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=1e-8
        )
        self.lr_scheduler = LambdaLR(self.optimizer, factor)
        self.micro_steps = 0
        self.checkpoint_engine = _ClientStateLoader()

    # --- what the loop calls ------------------------------------------------------------------
    def __call__(self, **batch):
        return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        """At the accumulation boundary: clip, AdamW, the schedule's next lr, gradients cleared."""
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.grad is not None], self.clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    # --- checkpoints (train/checkpoint.py calls these as it calls DeepSpeed's) ------------------
    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool = False) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        folder = Path(save_dir, tag)
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder / STATE_FOLDER))
        if dist.get_rank() == 0:
            extra = {"client_state": client_state, "lr_scheduler": self.lr_scheduler.state_dict()}
            torch.save(extra, folder / CLIENT_FILE)
        dist.barrier()

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str, dict]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        folder = Path(load_dir, tag)
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(folder / STATE_FOLDER))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        extra = self.checkpoint_engine.load(str(folder / CLIENT_FILE), map_location="cpu")
        self.lr_scheduler.load_state_dict(extra["lr_scheduler"])
        self.micro_steps = 0
        return str(folder), extra["client_state"]

    def full_state_dict(self) -> dict | None:
        """Every weight, whole, on rank 0's CPU in the model's dtype (every rank takes part); None elsewhere."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() != 0:
            return None
        return {k: v.to(self.export_dtype) for k, v in state.items()}
