"""The memory plan: what a recipe's training step holds per GPU, why, and whether it fits.

One story, in the order a plan is made:

  items.py     the vocabulary: every plan item (Item), when in the step it is live (Phase) and
               which part of the plan it is (Kind); every module here and every switch names
               items by member, never by words
  estimate.py  the arithmetic: the bytes of a decoder layer's backward by phase, the loss chunk,
               the norms, the embedding, the FLOPs (what a layer holds, from its shapes)
  reserve.py   what no tensor shows: DeepSpeed's buffers from its config (FSDP2's from its layers), NCCL's per
               communicator, the CUDA context, kernel scratch, fragmentation
  traffic.py   sequence-parallel communication per GPU, the ring alone against Ulysses x ring
  budget.py    the Plan of a recipe on a grid; estimate() adds the arithmetic and each memory
               switch's own items (train/switches) per stage; budget, max_context, the text
               of `ringpatch plan`
  check.py     the memory check before a run: the plan's peak against the device, refused with
               the largest items and the switch that shrinks each
  simulate.py  the simulated rank: the trainer's own step on fake tensors at the real shape,
               counted by tracker.py (storages filed by code region, ringpatch/regions.py),
               beside the plan; census.py counts a real step's live tensors the same way

The plan reads the switch registry (train/switches: each switch's items, flags and remedy), and
the simulator runs the trainer's own model building (train/build.py); the trainer's preflight
and command build and check a Plan. Nothing else below train imports it.
"""


def for_recipe(recipe: str, nodes: int = 1, gpus_per_node: int = 8, device: str = "cuda"):
    """The plan of a recipe file on `nodes` x `gpus_per_node` ranks as it trains on `device`
    ("cuda" or "cpu"), what `ringpatch plan` prints, as a typed object (budget.Plan): its stages'
    budgets (`plan.budget(stage)`: items by Item, the reserve, host memory), the longest context
    (`plan.max_context(gpu_memory)`), the simulated rank (`plan.simulate()`). No process group, no
    download; a recipe the trainer would refuse raises ringpatch.errors.UserError with the reason.

        from ringpatch.plan import for_recipe
        plan = for_recipe("recipes/llama3-8b-1m-1node.yaml", nodes=1)
        plan.budget().total                 # GiB per GPU at the longest stage, reserve included
        plan.max_context(79).seq_len        # the longest sequence at 79 GiB per GPU
    """
    from ringpatch.errors import BadValue
    from ringpatch.plan.budget import on_device
    from ringpatch.train.preflight import preflight

    if device not in ("cuda", "cpu") or nodes < 1 or gpus_per_node < 1:
        raise BadValue(
            f"device must be cuda or cpu and nodes, gpus_per_node >= 1, got {device}, {nodes}, {gpus_per_node}"
        )
    plan = on_device(preflight(recipe, world=nodes * gpus_per_node), device)
    plan.dims.check_node(gpus_per_node)
    return plan


__all__ = ["for_recipe"]
