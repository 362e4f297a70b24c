"""DeepSpeed's ZeRO buffers read from a running engine, for holding the plan's (reserve.zero_buffers)
to them: tests/plan/test_zero_buffers.py on CPU, `make gpu-check` where DeepSpeed is installed.

What it reads is DeepSpeed's own state, by name (deepspeed/runtime/zero/stage3.py and
stage_1_and_2.py `ipg_buckets`, partitioned_param_coordinator.py `__n_available_params`), so a
DeepSpeed release that renames them makes `ZeroReadout` raise, never read zero."""

from __future__ import annotations

import torch

PHASES = ("loss", "final_norm", "layer", "embedding")
"""reserve.zero3_gathered's phases of the backward."""


class ZeroReadout:
    """Per step: the bytes of the gradient buckets ZeRO holds at the embedding's backward (the
    step's last, when every gradient has passed through them), and with ZeRO-3 the most weights
    (elements) gathered after any fetch in each phase: the LM head's forward and backward ("loss"),
    the final norm's, any decoder layer's backward with its recompute, and the embedding's.
    `lm` is the Hugging Face causal LM inside `engine` (model.embed_tokens, model.norm, lm_head)."""

    def __init__(self, engine, lm: torch.nn.Module):
        self.optimizer = engine.optimizer
        if not hasattr(self.optimizer, "ipg_buckets"):
            raise RuntimeError(
                f"{type(self.optimizer).__name__} has no ipg_buckets: not a DeepSpeed ZeRO 1-3 optimizer"
            )
        self.buckets: list[int] = []
        self.gathered = dict.fromkeys(PHASES, 0)
        self._backward = False
        lm.model.embed_tokens.register_full_backward_hook(self._read_buckets)
        offload = getattr(self.optimizer, "parameter_offload", None)
        if offload is None:  # ZeRO 1 and 2 gather nothing
            return
        self.coordinator = offload.get_param_coordinator()
        self._fetch, self._names = self.coordinator.fetch_sub_module, {id(m): n for n, m in lm.named_modules()}
        self._held()  # fails here, not inside a step, where DeepSpeed renamed it
        self.coordinator.fetch_sub_module = self._counted

    def step_begin(self) -> None:
        """Call before each step's forward."""
        self._backward = False

    def _read_buckets(self, *_):
        held = [b.buffer for b in self.optimizer.ipg_buckets.values() if b.buffer is not None]
        tensors = [t for x in held for t in (x if isinstance(x, list) else [x])]  # ZeRO 1-2: a list of one or two
        self.buckets.append(sum(t.numel() * t.element_size() for t in tensors))

    def _held(self) -> int:
        return self.coordinator._PartitionedParameterCoordinator__n_available_params

    def _counted(self, module, forward, *args, **kwargs):
        self._fetch(module, forward, *args, **kwargs)
        name = self._names.get(id(module), "")
        self._backward |= name.endswith("lm_head") and not forward
        if name.endswith("lm_head"):
            phase = "loss"
        elif not self._backward:
            return
        elif ".layers." in name:
            phase = "layer"
        elif name.endswith("model.norm") and not forward:
            phase = "final_norm"
        elif name.endswith("embed_tokens") and not forward:
            phase = "embedding"
        else:
            return
        self.gathered[phase] = max(self.gathered[phase], self._held())
