"""transformers.Trainer with ring attention: one changed line, `Trainer(...)` -> `RingTrainer(..., sp=N)`.

The Trainer's data sharding, loss normalisation and counts are made right for sequence
parallelism (the ranks of one ring are one data-parallel rank); the model is patched over the sp
group (pass it unpatched), `ulysses=U` splits that group into Ulysses x ring. What each fix does
and why: docs/design.md, "The Trainer integration".
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from ringpatch.attention.comm import resolve_group
from ringpatch.attention.layout import PACKED_LAYOUT
from ringpatch.errors import BadValue, Unsupported
from ringpatch.hf import patch_model, shard_batch
from ringpatch.parallel import ParallelDims, build_mesh


def _tokens_seen_per_ring(sp: int):
    """A callback: the Trainer adds the tokens of every process's batch to
    state.num_input_tokens_seen (a gather over all processes, each ring's batch sp times); at the
    end of each step, before the step is logged, it keeps 1/sp of what the step added. A
    callback rather than an override, since where the Trainer counts differs between releases."""
    from transformers import TrainerCallback

    class TokensSeenPerRing(TrainerCallback):
        def __init__(self):
            self.mark = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.mark = state.num_input_tokens_seen  # after a resumed checkpoint's state is loaded

        def on_step_end(self, args, state, control, **kwargs):
            state.num_input_tokens_seen = self.mark + (state.num_input_tokens_seen - self.mark) // sp
            self.mark = state.num_input_tokens_seen

    return TokensSeenPerRing()


def _refuse_accelerate_sequence_split(args, sp: int) -> None:
    """accelerate's own context or sequence parallelism (its ParallelismConfig cp_size / sp_size, from
    TrainingArguments.parallelism_config or `accelerate launch`'s environment) would split each
    sequence a second time: refused before the Trainer builds its accelerator."""
    config = getattr(args, "parallelism_config", None)
    env = os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "").lower() == "true"
    for key, meaning in (("cp_size", "context parallelism"), ("sp_size", "sequence parallelism")):
        size = getattr(config, key, None) or (int(os.environ.get(f"PARALLELISM_CONFIG_{key.upper()}", 1)) if env else 1)
        if size > 1:
            raise Unsupported(
                f"accelerate's {meaning} (ParallelismConfig {key} {size}) and RingTrainer's ring (sp {sp}) would both "
                f"split each sequence: use one. Drop {key} (TrainingArguments.parallelism_config, or "
                f"parallelism_config_{key} in the accelerate config) to keep RingTrainer's exact ring, or train with "
                "the stock Trainer on accelerate's"
            )


def _fsdp_asked(args) -> str:
    """How FSDP was asked for (TrainingArguments.fsdp, or `accelerate launch` with an FSDP config), or ''."""
    if getattr(args, "fsdp", None):
        return f"TrainingArguments.fsdp {args.fsdp}"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return f"accelerate's FSDP config, version {os.environ.get('FSDP_VERSION', '1')}"
    return ""


class RingTrainerMixin:
    """Put before a Trainer class: `class MyTrainer(RingTrainerMixin, transformers.Trainer)`."""

    def __init__(self, *args, sp: int, layout: str = PACKED_LAYOUT, ulysses: int = 1, **kwargs):
        _refuse_accelerate_sequence_split(kwargs.get("args", args[1] if len(args) > 1 else None), sp)
        super().__init__(*args, **kwargs)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1 and self.args.world_size != world:
            cpu = (
                " on a machine without a GPU it needs TrainingArguments(use_cpu=True),"
                if not torch.cuda.is_available()
                else ""
            )
            raise BadValue(
                f"the launcher started {world} processes, but the Trainer runs as {self.args.world_size} "
                f"(TrainingArguments.parallel_mode {self.args.parallel_mode.value}):{cpu} so that every process "
                "joins one distributed run; as it is, each would train alone and RingTrainer could shard nothing"
            )
        if sp < 1 or world % sp:
            raise BadValue(f"sp={sp} must divide the {world} launched processes (dp = world / sp)")
        if getattr(self.model, "_ringpatch", None) is not None:
            raise BadValue("pass the model unpatched: the trainer patches it over its own sp group")
        if _fsdp_asked(self.args) and not self.is_fsdp_enabled and self.args.process_index == 0:
            print(
                f"ringpatch: RingTrainer: FSDP was asked for ({_fsdp_asked(self.args)}) but accelerate runs this as "
                f"{self.accelerator.distributed_type.value} without it (it applies FSDP only on accelerators), so "
                "every process holds the whole model, its gradients and optimizer states",
                file=sys.stderr,
                flush=True,
            )
        self.ring_dims = ParallelDims(world, sp, 1, layout, ulysses)
        self.ring_layout = layout
        if sp > 1 and (self.compute_metrics is not None or self.preprocess_logits_for_metrics is not None):
            raise Unsupported(
                "compute_metrics / preprocess_logits_for_metrics with sp > 1: each rank holds only its part of the "
                "sequence's logits, so metrics computed from them would be wrong; compute them in compute_loss "
                "(as TRL's SFTTrainer does), or evaluate with a separate unpatched run"
            )
        if world > 1:
            mesh = build_mesh(self.ring_dims, self.args.device.type)
            self.ring_group, self.dp_rank = mesh.seq_group, mesh.dp_rank
            self.ring_leaders = [r for r in range(world) if self.ring_dims.coords(r)[1] == 0]
        else:
            self.ring_group, self.dp_rank, self.ring_leaders = None, 0, [0]
        patch_model(self.model, group=self.ring_group, layout=layout)
        if sp > 1:
            self.gather_function = self._ring_gather_for_metrics
            self.add_callback(_tokens_seen_per_ring(sp))

    # --- data: sharded over dp only ---------------------------------------------------------
    def _ring_shard(self, dataloader):
        if self.ring_dims.sp == 1:
            return dataloader
        shard = getattr(dataloader, "batch_sampler", None)
        if shard is None or not hasattr(shard, "num_processes"):
            raise Unsupported(
                "RingTrainer shards map-style datasets; an iterable (streaming) dataset would give each rank of "
                "a ring different samples: materialise it (datasets.Dataset) or shard it over dp yourself"
            )
        shard.num_processes, shard.process_index = self.ring_dims.dp, self.dp_rank
        if self.ring_dims.dp == 1:
            shard.even_batches = False  # one data rank: the last batch as one process reads it
        return dataloader

    def _ring_gather_for_metrics(self, data, use_gather_object: bool = False):
        """The eval loop's gather (accelerate's gather_for_metrics) with one value per dp rank: a
        ring's ranks hold the same loss, and accelerate's drop of the last batch's repeats counts
        samples over dp ranks."""
        if use_gather_object or not torch.is_tensor(data):
            raise Unsupported("RingTrainer gathers tensors only in evaluation (eval_use_gather_object=False)")
        gathered = self.accelerator.gather(data)
        world = dist.get_world_size()
        gathered = gathered.reshape(world, -1, *data.shape[1:])[self.ring_leaders].flatten(0, 1)
        state = self.accelerator.gradient_state
        if state.end_of_dataloader and state.remainder > 0:
            gathered = gathered[: state.remainder]
        return gathered

    def get_train_dataloader(self):
        return self._ring_shard(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset=None):
        return self._ring_shard(super().get_eval_dataloader(eval_dataset))

    def get_total_train_batch_size(self, args) -> int:
        return self._train_batch_size * args.gradient_accumulation_steps * self.ring_dims.dp

    # --- loss -------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # the Trainer's own count (its rule for which labels count differs between releases),
        # gathered over every process when tokens are averaged: each ring's batches sp times
        batches, count = super().get_batch_samples(epoch_iterator, num_batches, device)
        if count is not None and self._ring_averaged():
            count = count // self.ring_dims.sp
        return batches, count

    def _ring_local(self, inputs) -> dict:
        if "labels" not in inputs:
            raise BadValue("RingTrainer needs labels in every batch (a causal-LM collator gives them)")
        return shard_batch(dict(inputs), group=self.ring_group, layout=self.ring_layout)

    def _ring_averaged(self) -> bool:
        return self.args.average_tokens_across_devices and dist.is_initialized() and dist.get_world_size() > 1

    def _ring_count(self, model, local: dict, num_items_in_batch):
        """The loss denominator: predicted tokens of this step's batches, each dp batch once
        (over every dp rank when tokens are averaged across devices)."""
        if num_items_in_batch is None:  # eval without a count (TRL): this step's batch
            count = local["num_items_in_batch"].clone()
            if self._ring_averaged():
                dist.all_reduce(count)
                count = count / self.ring_dims.sp
            return count
        count = torch.as_tensor(num_items_in_batch, device=local["num_items_in_batch"].device)
        if not model.training and self._ring_averaged():  # prediction_step's gather counted each ring sp times
            count = count / self.ring_dims.sp
        return count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        local = self._ring_local(inputs)
        local["num_items_in_batch"] = self._ring_count(model, local, num_items_in_batch)
        outputs = model(**local)
        loss = outputs.loss  # the ring's sum over the group / the count
        if self._ring_averaged():
            loss = loss * self.ring_dims.dp  # DDP averages over every process; a ring's ranks share one loss
        return (loss, outputs) if return_outputs else loss


class RingSFTTrainerMixin(RingTrainerMixin):
    """TRL's SFTTrainer over dp x sp: its own compute_loss (fused LM head, entropy and token
    accuracy) runs on this rank's part of the batch with the count over dp batches. TRL's loss
    is this rank's summed token loss over the count, times the number of processes, which DDP
    then averages: the sum over a ring's disjoint parts is the full-sequence loss, so both the
    logged loss (a mean over processes) and the gradients come out exact; its metrics are sums
    over processes of disjoint tokens, exact too."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        local = self._ring_local(inputs)
        count = self._ring_count(model, local, num_items_in_batch)
        if not self._ring_averaged():
            count = count / self.ring_dims.sp  # TRL divides this rank's part by it; a ring holds sp parts
        before = getattr(self, "_total_train_tokens", None)
        result = super(RingTrainerMixin, self).compute_loss(model, local, return_outputs, num_items_in_batch=count)
        if model.training and before is not None:
            self._ring_count_tokens(inputs, before)
        if not model.training and self.ring_group is not None:
            # eval: every rank of a ring reports the ring's loss (the Trainer gathers one value per rank)
            loss = result[0] if return_outputs else result
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=resolve_group(self.ring_group)[0])
            loss = loss / self.ring_dims.sp
            result = (loss, result[1]) if return_outputs else loss
        return result

    def _ring_count_tokens(self, inputs, before) -> None:
        """TRL's num_tokens metric counted this rank's part of a sequence as a whole row; count the
        full batch as TRL does on one process (its attention_mask, or padding-free: the row
        length), each dp batch once."""
        mask = inputs.get("attention_mask")
        tokens = mask.sum() if mask is not None else torch.tensor(inputs["position_ids"].size(1))
        tokens = tokens.to(self.args.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(tokens)
            tokens = tokens // self.ring_dims.sp
        self._total_train_tokens = before + tokens.item() // self._tp_size
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]


def _trainer_class():
    from transformers import Trainer

    class RingTrainer(RingTrainerMixin, Trainer):
        """transformers.Trainer over dp x sp: `RingTrainer(model=..., args=..., train_dataset=..., sp=2)`."""

    return RingTrainer


def _sft_trainer_class():
    from trl import SFTTrainer

    class RingSFTTrainer(RingSFTTrainerMixin, SFTTrainer):
        """TRL's SFTTrainer over dp x sp: `RingSFTTrainer(model=..., args=SFTConfig(...), ..., sp=2)`."""

    return RingSFTTrainer


def __getattr__(name: str):
    # built on first use: importing ringpatch.integrations loads neither transformers nor trl
    builders = {"RingTrainer": _trainer_class, "RingSFTTrainer": _sft_trainer_class}
    if name in builders:
        cls = builders[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
