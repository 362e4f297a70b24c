"""What a run is and holds before it starts: the recipe, its memory switches, preflight, and the
memory plan (what a training step holds per GPU, why, and whether it fits). One layer under
train, which runs what this decides and checks.

One story, in the order a plan is made:

  recipe.py    the recipe: every key, its type, default and check (ringpatch/schema.py markers)
  switches/    the memory switches, one module each (its key, checks, how it is applied to a
               model, its items, flags and remedy), registered in switches.SWITCHES
  ds_config.py the DeepSpeed config the recipe implies, with an overlay of tuning knobs
  preflight.py the recipe against the launched world, before any process group or download
  items.py     the vocabulary: every plan item (Item), when in the step it is live (Phase) and
               which part of the plan it is (Kind); every module here and every switch names
               items by member, never by words
  estimate.py  the arithmetic: the bytes of a decoder layer's backward by phase, the loss chunk,
               the norms, the embedding, the FLOPs (what a layer holds, from its shapes)
  reserve.py   what no tensor shows: DeepSpeed's buffers from its config (a replay of ZeRO-3's
               coordinator), FSDP2's from its layers, NCCL's per communicator, the CUDA context,
               kernel scratch, fragmentation
  traffic.py   sequence-parallel communication per GPU, the ring alone against Ulysses x ring
  budget.py    the Plan of a recipe on a grid; estimate() adds the arithmetic and each memory
               switch's own items per stage; budget, max_context, the text of `ringpatch plan`
  check.py     the memory check before a run: the plan's peak against the device, refused with
               the largest items and the switch that shrinks each
  model.py     the model and batch of a step as the trainer builds them: an LM from its config,
               the switches and the ring applied, its loss module, a rank's part of a batch
  simulate.py  the simulated rank: that step on fake tensors at the real shape, counted by
               tracker.py (storages filed by code region, ringpatch/regions.py), beside the
               plan; census.py counts a real step's live tensors the same way
  zero_readout.py, fsdp2_readout.py
               the engines' buffers read back from a running DeepSpeed or FSDP2, to hold the
               reserve's to them (tests/plan, `make gpu-check`)
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
    from ringpatch.plan.preflight import preflight

    if device not in ("cuda", "cpu") or nodes < 1 or gpus_per_node < 1:
        raise BadValue(
            f"device must be cuda or cpu and nodes, gpus_per_node >= 1, got {device}, {nodes}, {gpus_per_node}"
        )
    plan = on_device(preflight(recipe, world=nodes * gpus_per_node), device)
    plan.dims.check_node(gpus_per_node)
    return plan


__all__ = ["for_recipe"]
