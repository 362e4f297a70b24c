"""The memory plan: what a recipe's training step holds per GPU, why, and whether it fits.

One story, in the order a plan is made:

  items.py     the vocabulary: every plan item (Item), when in the step it is live (Phase) and
               which part of the plan it is (Kind); every module here and every switch names
               items by member, never by words
  estimate.py  the arithmetic: the bytes of a decoder layer's backward by phase, the loss chunk,
               the norms, the embedding, the FLOPs (what a layer holds, from its shapes)
  reserve.py   what no tensor shows: DeepSpeed's buffers from its config, NCCL's per
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
