"""The memory plan's vocabulary: what it counts (Item), where in a training step each is live
(Phase), and which part of the plan it belongs to (Kind).

A step's peak is everything held through the step plus the largest of the backwards that never
overlap: a layer's, the loss chunk's, the final norm's and the input embedding's (estimate.total_gib). Every module that
names a plan item (the estimate, the switches and their remedies, preflight, the simulator, the
benches) names it by its member here, never by its words.
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    STEP = "held through the step"
    LAYER = "a layer's backward"
    LOSS = "the loss chunk's backward"
    FINAL_NORM = "the final norm's backward"
    EMBEDDING = "the input embedding's backward"


class Kind(enum.Enum):
    MODEL_STATE = "model states (ZeRO arithmetic)"
    ACTIVATION = "the step's tensors"
    DEEPSPEED = "the engine's buffers (DeepSpeed's, FSDP2's)"


class Item(enum.Enum):
    """A plan item: its words (printed), when it is live, its part of the plan."""

    WEIGHTS = ("weights", Phase.STEP, Kind.MODEL_STATE)
    GRADIENTS = ("gradients", Phase.STEP, Kind.MODEL_STATE)
    GRADIENTS_AS_MADE = ("gradients, as the layers' backward makes them", Phase.LAYER, Kind.MODEL_STATE)
    """A CPU's: DeepSpeed's gradient partitions are memory only once written, after the loss's backward."""
    OPTIMIZER = ("optimizer", Phase.STEP, Kind.MODEL_STATE)
    CHECKPOINTED = ("checkpointed activations", Phase.STEP, Kind.ACTIVATION)
    UNCHECKPOINTED = ("uncheckpointed layers", Phase.STEP, Kind.ACTIVATION)
    KEPT_ATTENTION = ("kept attention outputs", Phase.STEP, Kind.ACTIVATION)
    MLP_BACKWARD = ("layer backward (MLP)", Phase.LAYER, Kind.ACTIVATION)
    NORM_BACKWARD = ("layer backward (norm)", Phase.LAYER, Kind.ACTIVATION)
    ATTENTION_BACKWARD = ("layer backward (attention)", Phase.LAYER, Kind.ACTIVATION)
    LOSS_CHUNK = ("loss chunk", Phase.LOSS, Kind.ACTIVATION)
    FINAL_NORM_BACKWARD = ("final norm backward", Phase.FINAL_NORM, Kind.ACTIVATION)
    EMBEDDING_BACKWARD = ("embedding backward", Phase.EMBEDDING, Kind.ACTIVATION)
    """The last backward: the embedding's dense gradient (tied, beside the LM head's and their sum),
    counted beyond the layers' held tensors, which are all freed by then."""
    OFFLOADED = ("offloaded activations (host memory)", Phase.STEP, Kind.ACTIVATION)
    """activation_offload's layer inputs: in the plan of a CPU run, where host and device are one memory."""
    ZERO_BUCKETS = ("ZeRO gradient buckets", Phase.STEP, Kind.DEEPSPEED)
    ZERO_BUCKETS_AS_FILLED = ("ZeRO gradient buckets, as the layers' backward fills them", Phase.LAYER, Kind.DEEPSPEED)
    """A CPU's: pages of a bucket DeepSpeed allocated whole become resident only when written."""
    LAYER_GATHERED = ("ZeRO-3 gathered weights (layer)", Phase.LAYER, Kind.DEEPSPEED)
    LOSS_GATHERED = ("ZeRO-3 gathered weights (LM head)", Phase.LOSS, Kind.DEEPSPEED)
    FINAL_NORM_GATHERED = ("ZeRO-3 gathered weights (final norm)", Phase.FINAL_NORM, Kind.DEEPSPEED)
    EMBEDDING_GATHERED = ("ZeRO-3 gathered weights (embedding)", Phase.EMBEDDING, Kind.DEEPSPEED)
    FSDP2_LAYER = ("FSDP2 gathered weights and reduce-scatter (layer)", Phase.LAYER, Kind.DEEPSPEED)
    FSDP2_ROOT = ("FSDP2 gathered weights (embedding, LM head)", Phase.STEP, Kind.DEEPSPEED)
    """The root's weights: fully_shard leaves the root gathered from its forward to the end of its backward."""
    FSDP2_ROOT_GRADIENTS = ("FSDP2 root gradients (LM head), unsharded", Phase.STEP, Kind.DEEPSPEED)
    """The LM head's gradient, whole in the compute dtype from the loss's backward until the root's
    gradients are reduced at the end of the backward."""

    def __init__(self, words: str, phase: Phase, kind: Kind):
        self.words, self.phase, self.kind = words, phase, kind

    def __str__(self) -> str:
        return self.words
