"""What FSDP2 holds beside a decoder layer's backward, read from its parameter groups, for holding
the plan's FSDP2 buffers (reserve.fsdp2_buffers) to them: tests/plan/test_fsdp2_buffers.py.

FSDP2's state is private (torch/distributed/fsdp/_fully_shard: FSDPParamGroup `is_unsharded`,
`_all_gather_result`, `comm_ctx.reduce_scatter_states`, `reduce_scatter_state` before torch 2.13);
a torch release that renames it makes `Fsdp2Readout` raise, never read zero."""

from __future__ import annotations

import torch

KINDS = ("root gathered", "root gradients", "layers gathered", "layer gradients", "reduce-scatter inputs")


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class Fsdp2Readout:
    """After each decoder layer's backward (its first module's, so every gradient of the layer is
    made and FSDP2 has not yet reduced them), the bytes FSDP2 holds: the root's weights gathered
    (embedding, final norm, LM head) and the root's unsharded gradients so far, the decoder layers'
    gathered or being gathered (the one whose backward ran and the one prefetched), that layer's
    unsharded gradients, and the reduce-scatter inputs kept in flight. `peaks` keeps the largest of
    each over the step."""

    def __init__(self, root: torch.nn.Module, layers: list[torch.nn.Module], first_modules: list[torch.nn.Module]):
        self.root = root._get_fsdp_state()._fsdp_param_group
        self.layers = [layer._get_fsdp_state()._fsdp_param_group for layer in layers]
        self.peaks = dict.fromkeys(KINDS, 0)
        self.samples: list[dict[str, int]] = []  # FSDP2 builds its communication state at the first forward
        for index, module in enumerate(first_modules):
            module.register_full_backward_hook(lambda *_, i=index: self._sample(i))

    @staticmethod
    def _gathered(group) -> int:
        held = sum(_nbytes(p.unsharded_param) for p in group.fsdp_params) if group.is_unsharded else 0
        result = group._all_gather_result  # all-gathered, not yet copied out (a prefetch)
        return held + (_nbytes(result.all_gather_output) if result is not None else 0)

    @staticmethod
    def _gradients(group) -> int:
        return sum(_nbytes(p.unsharded_param.grad) for p in group.fsdp_params) if group.is_unsharded else 0

    def read(self, layer: int | None = None) -> dict[str, int]:
        grads = 0 if layer is None else self._gradients(self.layers[layer])
        context = self.root.comm_ctx
        if hasattr(context, "reduce_scatter_states"):  # torch 2.13: a list, up to reduce_scatter_max_input_buffers
            states = context.reduce_scatter_states
        else:  # earlier releases keep the one in flight
            states = [s for s in (context.reduce_scatter_state,) if s is not None]
        return {
            "root gathered": self._gathered(self.root),
            "root gradients": self._gradients(self.root),
            "layers gathered": sum(self._gathered(g) for g in self.layers),
            "layer gradients": grads,
            "reduce-scatter inputs": sum(_nbytes(s.reduce_scatter_input) for s in states),
        }

    def _sample(self, layer: int) -> None:
        found = self.read(layer)
        self.samples.append(found)
        for kind, value in found.items():
            self.peaks[kind] = max(self.peaks[kind], value)
