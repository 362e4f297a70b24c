"""The training loop behind `ringpatch train` (see train.py for how it is started)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from ringpatch import checkpoint
from ringpatch.preflight import Plan, check_model_config, single_process_env


class Trainer:
    def __init__(self, plan: Plan):
        self.plan, self.recipe = plan, plan.recipe
        self.run_dir = Path(plan.recipe.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.identity = checkpoint.identity(plan.recipe, plan.dims.world)
        self.engine = None

    # --- set-up -----------------------------------------------------------------------------
    def _init_distributed(self) -> None:
        import torch.distributed as dist

        from ringpatch.mesh import build_mesh

        single_process_env()
        if not self.plan.cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator: gloo, no GPU
        else:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.plan.cuda else "gloo")
        self.rank = dist.get_rank()
        self.mesh = build_mesh(self.plan.dims, "cuda" if self.plan.cuda else "cpu")

    def _build_model(self):
        from transformers import AutoConfig, AutoModelForCausalLM

        from ringpatch.tokenizer import load_tokenizer

        spec, dtype = self.recipe.model, (torch.bfloat16 if self.plan.bf16 else torch.float32)
        self.tokenizer = load_tokenizer(spec.tokenizer, spec.name)
        if self.recipe.zero.stage == 3 and spec.init == "pretrained":  # partitioned as they load (zero.Init);
            # scratch weights are built whole, so every ZeRO stage starts from the same seeded init
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(self.plan.ds_config)  # must stay alive while loading
        torch.manual_seed(self.recipe.seed)  # the same scratch weights on every rank
        if spec.init == "scratch":
            config = AutoConfig.for_model(**spec.config)
            lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            lm = AutoModelForCausalLM.from_pretrained(spec.name, dtype=dtype)
            check_model_config(spec.config or {}, lm.config.to_dict(), spec.name)
        dims = self.plan.dims
        dims.check_heads(lm.config.num_attention_heads, lm.config.num_key_value_heads or lm.config.num_attention_heads)
        lm.config.use_cache = False
        if self.recipe.activation_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        import ringpatch

        return ringpatch.patch_model(lm, group=self.mesh.sp_group, layout=self.recipe.parallel.layout)

    def _build_engine(self, lm) -> None:
        import deepspeed
        from torch.optim.lr_scheduler import LambdaLR

        from ringpatch.train import LossModel, schedule

        model = LossModel(lm, chunk_tokens=self.recipe.loss_chunk_tokens)
        factor = schedule(self.recipe)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               config=self.plan.ds_config,
                                               lr_scheduler=lambda opt: LambdaLR(opt, factor))  # fmt: skip
        self.lm = self.engine.module.lm

    # --- data -------------------------------------------------------------------------------
    def _prepared(self, source: str, split: str, seq_len: int, kind: str):
        from ringpatch.prepare import prepare_shared

        return prepare_shared(self.recipe.data, source, split, self.tokenizer, seq_len, kind)

    def _micro_batches(self, data, sampler, micro_batch: int):
        """Full (micro_batch, seq_len) batches of this rank's dp index, forever."""
        indices = iter(sampler)
        while True:
            rows = [next(indices) for _ in range(micro_batch)]
            yield torch.stack([data[i]["input_ids"] for i in rows])

    # --- steps ------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        import ringpatch

        local = ringpatch.shard_batch({"input_ids": ids, "labels": ids}, group=self.mesh.sp_group,
                                      layout=self.recipe.parallel.layout)  # fmt: skip
        return self.engine(**{k: v.to(self.engine.device) for k, v in local.items()})

    def _all_finite(self, loss: torch.Tensor) -> bool:
        import torch.distributed as dist

        flag = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=loss.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _mean_over_world(self, value: float) -> float:
        """Every sp and tp rank of a dp index holds the same loss: the world mean is the dp mean."""
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(t)
        return t.item() / dist.get_world_size()

    def _step(self, batches, step: int, stage_index: int) -> float:
        """One optimizer step (grad_accum micro-steps). A non-finite loss stops every rank before
        the update, so the model and the last checkpoint stay as they were."""
        total = 0.0
        for micro in range(self.recipe.grad_accum):
            loss = self._forward(next(batches))
            if not self._all_finite(loss):
                tag = checkpoint.latest_tag(self.ckpt_dir)
                raise FloatingPointError(
                    f"the loss is {loss.item()} at step {step + 1} (stage {stage_index}, micro-step {micro}); stopped "
                    f"before the update. The last good checkpoint ({tag or 'none yet'} in {self.ckpt_dir}) is kept: "
                    "lower the learning rate or check the data, then run the same command to resume from it"
                )
            self.engine.backward(loss)
            self.engine.step()
            total += loss.item()
        return self._mean_over_world(total / self.recipe.grad_accum)

    @torch.no_grad()
    def _eval_loss(self, stage_index: int, seq_len: int) -> float | None:
        spec = self.recipe.data
        if spec.eval_source is None:
            return None
        data = self._prepared(spec.eval_source, spec.eval_split, seq_len, "eval")
        self.engine.module.eval()
        losses = [self._forward(data[i]["input_ids"][None]).item() for i in range(min(spec.eval_samples, len(data)))]
        self.engine.module.train()
        return sum(losses) / len(losses)

    # --- bookkeeping ------------------------------------------------------------------------
    def _resume(self, resume: bool) -> dict:
        if checkpoint.latest_tag(self.ckpt_dir) is not None and not resume:
            raise ValueError(f"{self.ckpt_dir} holds a checkpoint and --no-resume was given; choose another run_dir")
        state = checkpoint.load_latest(self.engine, self.ckpt_dir, self.identity) or {"step": 0}
        if self.rank == 0 and state["step"]:
            print(f"ringpatch: resuming {self.ckpt_dir} at step {state['step']}")
        if self.rank == 0:  # metrics past the checkpoint will be written again
            path = self.run_dir / "metrics.jsonl"
            kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= state["step"]] \
                if path.is_file() else []  # fmt: skip
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(line + "\n" for line in kept))
        return state

    def _save(self, step: int, stage_index: int, sampler) -> None:
        client_state = {"stage": stage_index, "sampler": sampler.state_dict()}
        checkpoint.save(self.engine, self.ckpt_dir, step, self.identity, client_state)

    def _log(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def _start_wandb(self) -> None:
        self.wandb = None
        if self.rank != 0 or self.recipe.wandb == "disabled":
            return
        import wandb

        self.wandb = wandb
        wandb.init(project=self.recipe.wandb_project, mode=self.recipe.wandb, dir=str(self.run_dir),
                   name=self.run_dir.name, config=dataclasses.asdict(self.recipe))  # fmt: skip

    def _export(self, name: str) -> None:
        from ringpatch.export import export_hf

        folder = self.run_dir / name
        export_hf(self.engine, folder, module=self.lm, tokenizer=self.tokenizer)
        if self.rank == 0:
            print(f"ringpatch: exported {folder}")

    # --- the run ----------------------------------------------------------------------------
    def _enter_stage(self, index: int) -> None:
        from ringpatch.rope import apply_rope

        stage = self.recipe.stages[index]
        apply_rope(self.lm, stage.seq_len, rope_theta=stage.rope_theta, rope_scaling=stage.rope_scaling)

    def _stage(self, index: int, first: int, state: dict, bar, max_steps: int | None) -> int:
        """Run stage `index` (global steps first..first+steps) from state["step"]; the step reached."""
        from ringpatch.data import DistributedSampler

        recipe, stage, step = self.recipe, self.recipe.stages[index], state["step"]
        end = first + stage.steps
        data = self._prepared(recipe.data.source, recipe.data.split, stage.seq_len, "train")
        sampler = DistributedSampler(len(data), self.plan.dims.dp, self.mesh.dp_rank, seed=recipe.seed + index)
        if state.get("stage") == index and step > first:
            sampler.load_state_dict(state["sampler"])
        micro_batch = stage.micro_batch or recipe.micro_batch
        batches = self._micro_batches(data, sampler, micro_batch)
        tokens = self.plan.dims.dp * micro_batch * recipe.grad_accum * stage.seq_len
        while step < end:
            if max_steps is not None and step >= max_steps:
                self._save(step, index, sampler)
                return step
            started = time.perf_counter()
            loss = self._step(batches, step, index)
            step += 1
            record = {"step": step, "stage": index, "seq_len": stage.seq_len, "loss": loss,
                      "lr": self.engine.get_lr()[0], "tokens_per_s": tokens / (time.perf_counter() - started)}  # fmt: skip
            if step % recipe.log_every == 0 or step == end:
                self._log(record)
            bar.set_postfix(stage=f"{index}@{stage.seq_len}", loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update()
            if recipe.save_every and step % recipe.save_every == 0 and step != end:
                self._save(step, index, sampler)
        eval_loss = self._eval_loss(index, stage.seq_len)
        if eval_loss is not None:
            self._log({"event": "eval", "step": step, "stage": index, "seq_len": stage.seq_len, "eval_loss": eval_loss})
            if self.rank == 0:
                bar.write(f"stage {index} ({stage.seq_len} tokens): held-out loss {eval_loss:.4f}")
        self._save(step, index, sampler)
        return step

    def _stages(self, state: dict, max_steps: int | None) -> None:
        from tqdm.auto import tqdm

        total = sum(s.steps for s in self.recipe.stages)
        import sys

        bar = tqdm(total=total, initial=state["step"], disable=self.rank != 0, unit="step", desc="ringpatch train",
                   mininterval=0.5 if sys.stderr.isatty() else 10)  # a log file gets a line every 10 s  # fmt: skip
        first, last = 0, len(self.recipe.stages) - 1
        for index, stage in enumerate(self.recipe.stages):
            self._enter_stage(index)  # every stage's RoPE in order, so a resumed run has the same
            end = first + stage.steps
            if state["step"] < end:
                state = dict(state, step=self._stage(index, first, state, bar, max_steps))
                if max_steps is not None and state["step"] >= max_steps and state["step"] < end:
                    bar.close()
                    return
                if index < last and self.recipe.export_stages:
                    self._export(f"stage{index}")
            first = end
        bar.close()
        self._export("final")

    def run(self, resume: bool = True, max_steps: int | None = None) -> None:
        import torch.distributed as dist

        self._init_distributed()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        self._build_engine(self._build_model())
        state = self._resume(resume)
        self._start_wandb()
        self._stages(state, max_steps)
        if self.wandb is not None:
            self.wandb.finish()
        del self.engine  # before the groups go (pytorch/pytorch#56297)
        dist.barrier()
        dist.destroy_process_group()
