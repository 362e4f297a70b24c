"""The training loop behind `ringpatch train` (command.py starts it).

Trainer.__init__ builds the whole run (groups, model, engine, resumed state, log); run() goes
through the stages: each applies its RoPE, reads its prepared data, takes its steps,
checkpoints, scores held-out data and exports; close() leaves the process group.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ringpatch.data.prepare import prepare_shared, prepared_folder
from ringpatch.data.sampler import ResumableSampler
from ringpatch.data.tokenizer import load_tokenizer
from ringpatch.errors import BadValue, Diverged
from ringpatch.hf.rope import apply_rope
from ringpatch.parallel import set_timeouts, stop
from ringpatch.plan.budget import Plan, stage_budget, step_flops
from ringpatch.plan.model import local_batch
from ringpatch.train import checkpoint
from ringpatch.train.build import (
    apply_optimizer_settings,
    build_engine,
    build_model,
    start_distributed,
    timeout,
    zero3_loading,
)
from ringpatch.train.export import export_hf
from ringpatch.train.metrics import RunLog, read_records
from ringpatch.train.report import write_report
from ringpatch.train.restart import Fault, note_stop, restart_notice
from ringpatch.train.stop import Stopped, StopRequest
from ringpatch.train.telemetry import MemoryPeak, StepClock, peak_tflops, slowest_rank
from ringpatch.train.watchdog import Heartbeat


class RunFolderGone(BadValue):
    """run_dir vanished or was replaced under a running run: nothing it writes would be kept."""


class RunFolder:
    """run_dir's identity (device and inode) as the run started, checked at every step: a folder
    deleted or replaced under a run (rm -rf, a sync tool) would swallow its metrics, checkpoints
    and lock without a word, and the run would end with exit 0."""

    def __init__(self, path: Path):
        self.path = path
        self.identity = self._stat()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def problem(self) -> str | None:
        now = self._stat()
        if now == self.identity:
            return None
        what = "was deleted" if now is None else "was replaced by another folder"
        return (
            f"run_dir {self.path} {what} while the run was running: its metrics, checkpoints and lock went with it, "
            "so the run stopped rather than write into nothing; restore the folder (or choose a new run_dir) and "
            "run the command again"
        )


class Trainer:
    def __init__(self, plan: Plan, resume: bool = True, stop_file: str | None = None, grace_s: float | None = None):
        recipe = plan.recipe
        self.stop_agreed = False
        self.fault = Fault.from_env()
        self.step_in_progress: int | None = None
        self.plan, self.recipe = plan, recipe
        self.run_dir = Path(recipe.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.record = checkpoint.recipe_record(recipe, plan.dims.world)
        self.mesh = start_distributed(plan)
        # once the group is up: a signal during the build is kept for the first step; before, while a
        # rank waits for its peers (one that refused to start, say), SIGTERM ends it at once, as the
        # launcher means when it stops the others, instead of after the launcher's 30 s grace
        self.stop_request = StopRequest(stop_file)
        self.rank = dist.get_rank()
        self.heartbeat = Heartbeat()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.folder = RunFolder(self.run_dir)  # its identity: rank 0's is checked every step
        dist.barrier()
        self.tokenizer = load_tokenizer(recipe.model.tokenizer, recipe.model.name)
        self._zero3_loading = zero3_loading(plan)  # kept alive for the run, as transformers asks
        self.engine = build_engine(plan, build_model(plan, self.mesh))
        set_timeouts(timeout(plan))  # DeepSpeed's groups too
        self.lm = self.engine.module.lm
        self.state, changed = checkpoint.resume(self.engine, self.ckpt_dir, self.record, allowed=resume)
        if self.state["step"]:
            apply_optimizer_settings(self.engine, recipe)  # DeepSpeed restored the checkpoint's
        if self.rank == 0 and self.state["step"]:
            print(f"ringpatch: resuming {self.ckpt_dir} at step {self.state['step']}")
            for key, (old, new) in changed.items():
                print(f"ringpatch: {key} changed since the checkpoint: {old} -> {new} (the recipe's value is used)")
        self.log = RunLog(self.run_dir, self.rank, recipe, resumed_step=self.state["step"])
        if changed:
            self.log.write({"event": "resume", "step": self.state["step"], "changed": changed})
        self._start_record(grace_s)

    def _start_record(self, grace_s: float | None) -> None:
        """The run's facts for its metrics: device, the peak MFU is taken against, a restart, and a
        grace before a scheduler's stop too short for the checkpoint measured last time."""
        device = self.engine.device
        self.clock, self.memory = StepClock(device), MemoryPeak(device)
        self.peak_tflops, source = peak_tflops(device, next(self.lm.parameters()).dtype, self.recipe.peak_tflops)
        if self.rank != 0:  # the record is rank 0's to write
            return
        record = {"event": "start", "step": self.state["step"], "world": self.plan.dims.world,
                  "device": str(device), "peak_tflops": self.peak_tflops, "peak_source": source}  # fmt: skip
        notice = restart_notice(self.run_dir, self.state["step"])
        if notice:
            record["restart"] = notice
        history = read_records(self.run_dir)  # the resumed run's, up to its checkpoint
        last = next((r for r in reversed(history) if r.get("event") == "checkpoint"), None)
        if grace_s is not None and last is not None and grace_s < last["seconds"]:
            step_s = next((r["step_s"] for r in reversed(history) if "step_s" in r), 0.0)
            record["grace_warning"] = (
                f"--grace {grace_s:g} s is shorter than the last checkpoint write, {last['seconds']:.1f} s (step "
                f"{last['step']}): a stop asked for that long before the time limit would be killed mid-checkpoint "
                f"and lose the steps since the one before; ask the scheduler for at least "
                f"{last['seconds'] + step_s:.0f} s (the checkpoint and a step) plus a margin"
            )
        self.log.write(record)
        for key in ("restart", "grace_warning"):
            if key in record:
                print(f"ringpatch: {'warning: ' if key == 'grace_warning' else ''}{record[key]}", flush=True)
        if self.peak_tflops is None:
            print(f"ringpatch: {source}", flush=True)

    # --- the run ----------------------------------------------------------------------------
    def run(self, max_steps: int | None = None) -> None:
        """Every stage from the resumed step on; with max_steps, stop (checkpointed) at that step."""
        total = sum(s.steps for s in self.recipe.stages)
        bar = tqdm(
            total=total,
            initial=self.state["step"],
            disable=self.rank != 0,
            unit="step",
            desc="ringpatch train",
            mininterval=0.5 if sys.stderr.isatty() else 10,
        )  # a log file: every 10 s
        state, first, last = self.state, 0, len(self.recipe.stages) - 1
        for index, stage in enumerate(self.recipe.stages):
            # every stage's RoPE in order, so a resumed run has the same
            apply_rope(self.lm, stage.seq_len, rope_theta=stage.rope_theta, rope_scaling=stage.rope_scaling)
            end = first + stage.steps
            if state["step"] < end:
                state = dict(state, step=self._stage(index, first, state, bar, max_steps))
                if max_steps is not None and state["step"] >= max_steps and state["step"] < end:
                    bar.close()
                    if self.rank == 0:  # a partial run's report too: it resumes later, but its figures are now
                        print(f"ringpatch: report in {write_report(self.run_dir)}")
                    return
                if index < last and self.recipe.export_stages:
                    self._export(f"stage{index}")
            first = end
        bar.close()
        self._export("final")
        if self.rank == 0:
            print(f"ringpatch: report in {write_report(self.run_dir)}")

    def close(self) -> None:
        self.stop_request.close()
        self.log.finish()
        self.heartbeat.close()
        del self.engine  # before the groups go (pytorch/pytorch#56297)
        stop()

    def _stage(self, index: int, first: int, state: dict, bar, max_steps: int | None) -> int:
        """Run stage `index` (global steps first..first+steps) from state["step"]; the step reached."""
        recipe, stage, step = self.recipe, self.recipe.stages[index], state["step"]
        end = first + stage.steps
        spec = recipe.stage_data(index)  # data, with this stage's source weights
        data = self._prepared(spec.source, spec.split, stage.seq_len, "train", spec)
        sampler = ResumableSampler(len(data), self.plan.dims.dp, self.mesh.dp_rank, seed=recipe.seed + index)
        prepared = prepared_folder(spec, spec.source, spec.split, self.tokenizer, stage.seq_len, "train")
        if state.get("stage") == index and step > first:
            saved = state.get("data")
            if saved is not None and saved != prepared.name:
                raise BadValue(
                    f"the training data of stages[{index}] changed since the checkpoint at step {step} (prepared then "
                    f"as {saved}, now as {prepared.name}: the source's files, the tokenizer or the filters differ), so "
                    "the run cannot continue where it stopped: restore the data, or start a new run_dir"
                )
            sampler.load_state_dict(state["sampler"])
        micro_batch = stage.micro_batch or recipe.micro_batch
        mixture = [0] * len(spec.sources) if "source_tokens" in data.column_names else None
        weights = stage.source_weights or [1] * len(recipe.data.sources)
        kept = [i for i, w in enumerate(weights) if w > 0]  # data.sources index of each of the stage's sources
        batches = self._micro_batches(data, sampler, micro_batch, mixture)
        tokens = self.plan.dims.dp * micro_batch * recipe.grad_accum * stage.seq_len
        budget = stage_budget(self.plan, index) if self.plan.model_config else None
        flops = step_flops(self.plan, index)
        while step < end:
            if max_steps is not None and step >= max_steps:
                self._save(step, index, sampler, prepared.name)
                return step
            self.clock.reset()
            self.memory.reset()
            self.step_in_progress = step + 1
            if self.fault is not None:
                self.fault.before_step(step + 1, self.rank)
            started = time.perf_counter()
            loss, waited = self._step(batches, step, index)
            seconds = time.perf_counter() - started
            step += 1
            stopping = self.stop_agreed and step != end  # every rank saw the same flag in the step's all-reduce; at a
            if stopping or (recipe.save_every and step % recipe.save_every == 0 and step != end):  # stage's end it
                self._save(step, index, sampler, prepared.name)  # first evaluates and exports
            record = {
                "step": step,
                "stage": index,
                "seq_len": stage.seq_len,
                "loss": loss,
                "lr": self.engine.get_lr()[0],
                "tokens_per_s": tokens / seconds,
                "tokens_per_s_per_gpu": tokens / seconds / self.plan.dims.world,
                "step_s": seconds,
                **{f"time_{phase}_s": round(t, 6) for phase, t in self.clock.seconds.items()},
            }
            if flops is not None and self.peak_tflops:
                record["mfu"] = flops / seconds / (self.peak_tflops * 1e12)
            record |= self._memory_record(index, budget)
            if mixture is not None and sum(mixture):  # the tokens this rank has read from each source, this stage
                share = [0.0] * len(recipe.data.sources)  # in data.sources' order, 0 for those left out
                for i, n in zip(kept, mixture, strict=True):
                    share[i] = round(n / sum(mixture), 6)
                record["source_share"] = share
            if step % recipe.log_every == 0 or step == end:
                record |= slowest_rank(seconds - waited, self.engine.device)  # a collective: every rank logs here
                self.log.write(record)
            bar.set_postfix(stage=f"{index}@{stage.seq_len}", loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update()
            if stopping:
                self._stop(step, index, bar)
        eval_loss = self._eval_loss(stage.seq_len)
        if eval_loss is not None:
            self.log.write(
                {"event": "eval", "step": step, "stage": index, "seq_len": stage.seq_len, "eval_loss": eval_loss}
            )
            if self.rank == 0:
                bar.write(f"stage {index} ({stage.seq_len} tokens): held-out loss {eval_loss:.4f}")
        self._save(step, index, sampler, prepared.name)
        return step

    # --- steps ------------------------------------------------------------------------------
    def _step(self, batches, step: int, stage_index: int) -> tuple[float, float]:
        """One optimizer step (grad_accum micro-steps), timed by phase: (the world's mean loss,
        seconds waited in the closing all-reduce). A non-finite loss stops every rank before the
        update, so the model and the last checkpoint stay as they were."""
        total, clock = 0.0, self.clock
        for micro in range(self.recipe.grad_accum):
            with clock("data"):
                rows = next(batches)
            with clock("forward"):
                loss = self._forward(rows)
            if not self._all_finite(loss):
                tag = checkpoint.latest_tag(self.ckpt_dir)
                raise Diverged(
                    f"the loss is {loss.item()} at step {step + 1} (stage {stage_index}, micro-step {micro}); stopped "
                    f"before the update. The last good checkpoint ({tag or 'none yet'} in {self.ckpt_dir}) is kept: "
                    "lower the learning rate or check the data, then run the same command to resume from it"
                )
            with clock("backward"):
                self.engine.backward(loss)
            with clock("optimizer"):
                self.engine.step()
            total += loss.item()
        started = time.perf_counter()
        mean = self._mean_over_world(total / self.recipe.grad_accum)
        return mean, time.perf_counter() - started

    def _forward(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        local = local_batch(rows, self.recipe, self.mesh)
        return self.engine(**{k: v.to(self.engine.device) for k, v in local.items()})

    @staticmethod
    def _all_finite(loss: torch.Tensor) -> bool:
        flag = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=loss.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _mean_over_world(self, value: float) -> float:
        """Every sp and tp rank of a dp index holds the same loss: the world mean is the dp mean.
        The same all-reduce carries each rank's stop request (stop.py): stop_agreed on every rank
        when any rank has one."""
        gone = self.folder.problem() if self.rank == 0 else None
        flags = [value, float(self.stop_request.pending), float(gone is not None)]
        t = torch.tensor(flags, dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(t)
        if t[2].item() > 0:  # every rank stops here, with rank 0's words
            words = [gone]
            dist.broadcast_object_list(words, src=0)
            raise RunFolderGone(words[0])
        self.stop_agreed = bool(t[1].item() > 0)
        return t[0].item() / dist.get_world_size()

    def _stop(self, step: int, index: int, bar) -> None:
        """Leave on request (stop.py) after `step` is checkpointed; the stop file is removed once honoured."""
        reason = self.stop_request.reason()
        self.log.write({"event": "stopped", "step": step, "stage": index, "reason": reason})
        stop_file = self.stop_request.stop_file
        if self.rank == 0:
            note_stop(self.run_dir, step)
            if stop_file is not None:
                stop_file.unlink(missing_ok=True)
            write_report(self.run_dir)
        bar.close()
        raise Stopped(step, reason)

    def _memory_record(self, stage: int, budget) -> dict:
        """This step's peak memory, the plan's figure beside it, and the warning when over."""
        measured = self.memory.read()
        if not measured or budget is None:
            return measured
        planned = self.memory.planned(budget)
        warning = self.memory.over_plan(stage, measured["mem_peak_gib"], planned, self.memory.parts(budget))
        if warning and self.rank == 0:
            tqdm.write(f"ringpatch: warning: {warning}")
        return measured | {"mem_planned_gib": planned}

    @torch.no_grad()
    def _eval_loss(self, seq_len: int) -> float | None:
        spec = self.recipe.data
        if spec.eval_source is None:
            return None
        data = self._prepared(spec.eval_source, spec.eval_split, seq_len, "eval")
        self.engine.module.eval()
        losses = [self._forward(data[i : i + 1]).item() for i in range(min(spec.eval_samples, len(data)))]
        self.engine.module.train()
        return sum(losses) / len(losses)

    # --- data and files ---------------------------------------------------------------------
    def _prepared(self, source: str, split: str, seq_len: int, kind: str, spec=None):
        return prepare_shared(
            spec or self.recipe.data,
            source,
            split,
            self.tokenizer,
            seq_len,
            kind,
            waiting=self.heartbeat.require(0, "preparing the data"),
        )

    @staticmethod
    def _micro_batches(data, sampler, micro_batch: int, mixture: list[int] | None = None):
        """Full batches of this rank's dp index, forever: input_ids and doc_position_ids, each
        (micro_batch, seq_len); a mixture's tokens per source are added to `mixture` as read."""
        indices = iter(sampler)
        while True:
            rows = [data[next(indices)] for _ in range(micro_batch)]
            if mixture is not None:
                for row in rows:
                    for i, n in enumerate(row["source_tokens"].tolist()):
                        mixture[i] += n
            yield {key: torch.stack([row[key] for row in rows]) for key in ("input_ids", "doc_position_ids")}

    def _save(self, step: int, stage_index: int, sampler, prepared: str) -> None:
        client_state = {"stage": stage_index, "sampler": sampler.state_dict(), "data": prepared}
        with self.clock("checkpoint"):
            checkpoint.save(
                self.engine, self.ckpt_dir, step, self.record, client_state, keep_last=self.recipe.keep_last
            )
        seconds = self.clock.last  # what a scheduler's grace before a stop must cover
        self.log.write({"event": "checkpoint", "step": step, "seconds": round(seconds, 3)})
        if self.rank == 0:
            tqdm.write(f"ringpatch: checkpoint step {step} written in {seconds:.1f} s")

    def _export(self, name: str) -> None:
        folder = self.run_dir / name
        export_hf(self.engine, folder, module=self.lm, tokenizer=self.tokenizer)
        if self.rank == 0:
            print(f"ringpatch: exported {folder}")
