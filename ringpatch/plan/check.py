"""The memory check: a plan's peak per device (its tensors and reserve, the largest stage) against
the device's memory, refused before anything starts with the three largest items and the switch
that shrinks each (plan/switches' remedies, then ZeRO's); the device's and the host's memory; and
the GPU attention kernels' 32-bit index edge, which no stage may reach."""

from __future__ import annotations

import os

import torch

from ringpatch.attention.kernels import INDEX_EDGE
from ringpatch.errors import BadValue
from ringpatch.parallel import launch_int
from ringpatch.plan import switches
from ringpatch.plan.budget import Plan, index_elements, index_limit, stage_budget
from ringpatch.plan.estimate import GIB
from ringpatch.plan.items import Item


def peak_gib(plan: Plan) -> tuple[float, int] | None:
    """The largest planned GiB per GPU (tensors and reserve) over the stages, and that stage's
    index (None: no model config)."""
    if plan.model_config is None:
        return None
    totals = [stage_budget(plan, i).total for i in range(len(plan.recipe.stages))]
    top = max(range(len(totals)), key=totals.__getitem__)
    return totals[top], top


def _remedy(recipe, item: Item) -> str:
    """The recipe switch that shrinks an estimate item (when not already on): the switches'
    remedies (zero.offload's among them), then a higher ZeRO stage."""
    found = switches.remedy(recipe, item)
    if found:
        return found
    zero = "zero.stage: 3" if recipe.zero.stage < 3 else "more ranks (parallel.sp)"
    return {
        Item.WEIGHTS: zero,
        Item.GRADIENTS: zero,
        Item.GRADIENTS_AS_MADE: zero,
        Item.OPTIMIZER: "zero.stage: 1" if recipe.zero.stage == 0 else "more ranks (parallel.sp)",
        Item.ZERO_BUCKETS: "a smaller reduce_bucket_size in the DeepSpeed file",
        Item.ZERO_BUCKETS_AS_FILLED: "a smaller reduce_bucket_size in the DeepSpeed file",
    }.get(item, "more ranks (parallel.sp)")


def check_index_edge(plan: Plan) -> None:
    """Every stage's attention kernel calls stay under the 2^31 elements where the GPU kernels'
    32-bit offsets overflow (the ring refuses such a call too, once launched: this says so before,
    and --force does not pass it)."""
    if plan.model_config is None:
        return
    r = plan.recipe
    for i, stage in enumerate(r.stages):
        micro_batch = stage.micro_batch or r.micro_batch
        elements = index_elements(plan, stage.seq_len, micro_batch)
        if elements is not None and elements >= INDEX_EDGE:
            longest = index_limit(plan, micro_batch)
            ranks = f"parallel.sp {r.parallel.sp}" + (
                f" (ulysses {r.parallel.ulysses})" if r.parallel.ulysses > 1 else ""
            )
            raise BadValue(
                f"stages[{i}] (seq_len {stage.seq_len:,}, micro_batch {micro_batch}) under {ranks}: one attention "
                f"kernel call would take {elements:,} elements, past the 2^31 where the GPU kernels index with 32-bit "
                f"integers (a failed or silently wrong step); at most {longest:,} tokens fit under it: raise "
                "parallel.sp, or move ranks from parallel.ulysses to the ring (each ring rank holds fewer tokens)"
            )


def check_memory(plan: Plan, capacity_gib: float, what: str) -> None:
    """The plan's peak per device (tensors and reserve) fits `capacity_gib` (what: the device, for the message)."""
    peak = peak_gib(plan)
    if peak is not None and peak[0] > capacity_gib:
        total, stage = peak
        r = plan.recipe
        found = stage_budget(plan, stage)
        largest = sorted(found.items.items(), key=lambda kv: -kv[1])[:3]
        named = "; ".join(f"{k} {v:.1f} GiB (try {_remedy(r, k)})" for k, v in largest)
        raise BadValue(
            f"the plan needs {total:.1f} GiB per device at stages[{stage}] (seq_len {r.stages[stage].seq_len}): "
            f"{found.tensors:.1f} planned + {sum(found.reserve.values()):.1f} reserve, more than the "
            f"{capacity_gib:.1f} GiB of {what}. Largest: {named}. Or raise parallel.sp, lower micro_batch or "
            "seq_len (see `ringpatch plan`), or pass --force to start anyway"
        )


def device_memory_gib() -> tuple[float, str]:
    """(GiB, description) of what one rank may use: its GPU's memory, or on CPU the host's
    memory shared by the ranks of this node."""
    if torch.cuda.is_available():
        index = launch_int("LOCAL_RANK", 0) % torch.cuda.device_count()
        props = torch.cuda.get_device_properties(index)
        return props.total_memory / GIB, f"GPU {index} ({props.name})"
    local = launch_int("LOCAL_WORLD_SIZE", 1, minimum=1)
    total = host_memory_gib()
    return total / local, f"this host's {total:.1f} GiB shared by {local} local rank(s)"


def host_memory_gib() -> float:
    """This host's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
