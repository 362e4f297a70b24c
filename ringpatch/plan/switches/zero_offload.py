"""zero.offload: the optimizer step in host memory (the mechanism: plan/ds_config.py writes
DeepSpeed's offload_optimizer, and offload_param at ZeRO-3 for "cpu"; train/fsdp2.py FSDP2's
CPUOffloadPolicy)."""

from __future__ import annotations

from typing import Literal

from ringpatch.errors import BadValue, Unsupported
from ringpatch.plan.items import Item
from ringpatch.plan.switches.base import Switch


class ZeroOffload(Switch):
    section = "zero"
    key = "offload"
    annotation = Literal["none", "cpu", "optimizer"]
    default = "none"
    doc = (
        'Host memory for the optimizer step: "cpu" the optimizer state and the fp32 gradients (stages '
        '1-3) and the parameters (stage 3); "optimizer" the optimizer state and fp32 gradients only, the '
        "parameters' shards staying on the GPUs (DeepSpeed's offload_optimizer alone)."
    )
    usage = "optimizer"
    does = (
        "the optimizer state and the gradient partitions in host memory, the optimizer step on the CPU; "
        "`zero.offload: cpu` the parameter shards too (ZeRO-3, FSDP2)"
    )
    costs = (
        "each step's gradients copied to the host and the updated weights back; a CPU Adam step; "
        "`cpu` gathers every layer's weights from the host"
    )

    def check(self, recipe) -> None:
        offload = recipe.zero.offload
        if offload != "none" and recipe.zero.stage == 0:
            raise BadValue(
                f"zero.offload: {offload} needs zero.stage >= 1 (there is no optimizer partition to offload at 0)"
            )
        if offload == "optimizer" and recipe.engine == "fsdp2":
            raise Unsupported(
                "engine: fsdp2 with zero.offload: optimizer: FSDP2's CPU offload moves the parameters with the "
                "optimizer state; use zero.offload: cpu, or engine: deepspeed to keep the parameters on the GPUs"
            )

    def state_flags(self, recipe, cuda: bool) -> dict:
        # what moves to the host leaves the device; on a CPU run the host is the device
        offload = recipe.zero.offload if cuda else "none"
        return {"optimizer_on_host": offload != "none", "parameters_on_host": offload == "cpu"}

    def plan_words(self, recipe) -> str:
        return {"none": "", "cpu": ", CPU offload", "optimizer": ", optimizer offload"}[recipe.zero.offload]

    def remedy(self, recipe, item: Item) -> str | None:
        offload, stage = recipe.zero.offload, recipe.zero.stage
        everything = "zero.offload: cpu"
        if item is Item.WEIGHTS and stage == 3 and offload != "cpu":
            return everything
        if offload != "none" or stage == 0:
            return None
        if item is Item.OPTIMIZER or (item is Item.GRADIENTS and stage >= 2):
            return everything if recipe.engine == "fsdp2" else "zero.offload: optimizer"
        return None


ZERO_OFFLOAD = ZeroOffload()
