"""Building a run: the process groups, the model, the engine (DeepSpeed, or FSDP2: fsdp2.py).

Each is one function of the plan, called in this order by the trainer (loop.py):
start_distributed -> load_tokenizer -> zero3_loading -> build_model -> build_engine.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from ringpatch.errors import Missing
from ringpatch.parallel import Mesh, build_mesh, local_device, single_process_env
from ringpatch.parallel.process import unlink_deepspeed_shm
from ringpatch.plan.budget import Plan
from ringpatch.plan.model import LossModel, lm_from_config, prepare_lm
from ringpatch.plan.preflight import check_model_config
from ringpatch.train.schedule import schedule


def start_distributed(plan: Plan) -> Mesh:
    """Join the launcher's group through DeepSpeed (its CPU accelerator and gloo without a GPU)
    and build the dp x sp x tp grid."""
    single_process_env()
    _, backend = local_device()
    if plan.recipe.engine == "fsdp2":
        import torch.distributed as dist

        dist.init_process_group(backend, timeout=timeout(plan))
        return build_mesh(plan.dims, "cuda" if plan.cuda else "cpu")
    if not plan.cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must be set before deepspeed is imported
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, timeout=timeout(plan))
    if not plan.cuda:
        unlink_deepspeed_shm()  # DeepSpeed leaves its CPU all-reduce workspaces in /dev/shm
    return build_mesh(plan.dims, "cuda" if plan.cuda else "cpu")


def timeout(plan: Plan) -> timedelta:
    """How long a collective waits for a missing rank: the recipe's timeout_minutes, else 5
    minutes on CPU and 30 on GPU (a long first compile or a slow load may take minutes there)."""
    minutes = plan.recipe.timeout_minutes or (30.0 if plan.cuda else 5.0)
    return timedelta(minutes=minutes)


def zero3_loading(plan: Plan):
    """Under ZeRO-3 a pretrained model is partitioned as it loads (zero.Init): transformers reads
    the config from this object, which must stay alive while the model loads and trains. None
    otherwise; scratch weights are built whole, so every ZeRO stage starts from the same seeded init."""
    if plan.recipe.engine != "deepspeed" or plan.recipe.zero.stage != 3 or plan.recipe.model.init != "pretrained":
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(plan.ds_config)


def build_model(plan: Plan, mesh: Mesh):
    """The recipe's causal LM (loaded or built from its config), ring-patched over the sp group."""
    return prepare_lm(plan, load_lm(plan), mesh)


def load_lm(plan: Plan):
    """The recipe's causal LM: its pretrained weights, or its config with seeded random weights."""
    from transformers import AutoModelForCausalLM

    spec = plan.recipe.model
    torch.manual_seed(plan.recipe.seed)  # the same scratch weights on every rank
    if spec.init == "scratch":
        return lm_from_config(spec.config, plan.bf16)
    try:
        lm = AutoModelForCausalLM.from_pretrained(spec.name, dtype=torch.bfloat16 if plan.bf16 else torch.float32)
    except OSError as e:  # a hub id that does not exist, no network, a damaged download
        raise Missing(f"model.name {spec.name} could not be loaded: {str(e).splitlines()[0]}") from None
    check_model_config(spec.config or {}, lm.config.to_dict(), spec.name)
    return lm


def build_engine(plan: Plan, lm):
    """deepspeed.initialize on LossModel(lm), with the plan's config and the recipe's schedule;
    with engine: fsdp2, fsdp2.Fsdp2Engine on it instead."""
    model = LossModel(lm, chunk_tokens=plan.recipe.loss_chunk_tokens)
    factor = schedule(plan.recipe)
    if plan.recipe.engine == "fsdp2":
        from ringpatch.train.fsdp2 import Fsdp2Engine

        return Fsdp2Engine(model, plan.recipe, plan.bf16, local_device()[0], factor)
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=plan.ds_config,
        lr_scheduler=lambda opt: LambdaLR(opt, factor),
    )
    return engine


def apply_optimizer_settings(engine, recipe) -> dict[str, tuple]:
    """Make the recipe's optimizer settings the ones in force, after a checkpoint was loaded.

    DeepSpeed restores the optimizer's param groups (betas, weight decay) and the schedule's
    base learning rate from the checkpoint, so a recipe changed between runs would silently keep
    the old values. The recipe wins; the schedule keeps its step, and the current lr is set
    from the new base. Returns {setting: (checkpoint's value, recipe's value)} for what changed."""
    o, scheduler = recipe.optim, engine.lr_scheduler
    wanted = {"lr": o.lr, "betas": tuple(o.betas), "weight_decay": o.weight_decay}
    found = {
        "lr": scheduler.base_lrs[0],
        "betas": tuple(engine.optimizer.param_groups[0]["betas"]),
        "weight_decay": engine.optimizer.param_groups[0]["weight_decay"],
    }
    scheduler.base_lrs = [o.lr] * len(engine.optimizer.param_groups)
    lrs = [o.lr * factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]  # what its next step gives
    for group, lr in zip(engine.optimizer.param_groups, lrs, strict=True):
        group.update(initial_lr=o.lr, lr=lr, betas=wanted["betas"], weight_decay=o.weight_decay)
    return {f"optim.{k}": (found[k], v) for k, v in wanted.items() if found[k] != v}
