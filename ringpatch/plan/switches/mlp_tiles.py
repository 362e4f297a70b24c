"""mlp_tiles: N, the sequence-tiled MLP (1: off).

Each decoder layer's MLP runs over N tiles of its rank's tokens. Forward keeps none of the
(tokens x intermediate) gate, up and product tensors, only the MLP's input; backward recomputes
the MLP one tile at a time and accumulates the weight gradients over the tiles. The peak of the
MLP falls from about 3 x tokens x intermediate to 1/N of it, at the cost of one more MLP
forward per step (ALST: Bekman et al. 2025, arXiv:2506.13996, which ships the autograd function
used here as DeepSpeed's TiledMLP; it tells ZeRO to reduce a weight's gradient only after the
last tile). Where DeepSpeed is not installed (engine: fsdp2), SequenceTiledMLP does the same.

Exact: a gated MLP acts on each token alone, so the tiles' outputs are the untiled output's rows,
and the weight gradients are sums over tokens, split into N partial sums (float32 rounding only).
Only MLPs of that form are tiled (gate_proj, up_proj, down_proj: Llama, Mistral, Qwen); any other
is refused, since a mixture-of-experts block routes over all tokens together.
"""

from __future__ import annotations

import types
from typing import Annotated

import torch

from ringpatch.errors import BadValue
from ringpatch.hf.models import GATED_MLP_MODEL_TYPES
from ringpatch.plan.items import Item
from ringpatch.plan.switches.base import Switch
from ringpatch.schema import POSITIVE

GATED = ("gate_proj", "up_proj", "down_proj")


def tile_count(tokens: int, tiles: int) -> int:
    """At most `tiles`, and exactly as many pieces as torch.chunk cuts `tokens` into. TiledMLP's
    backward chunks the (batch x sequence) tokens into its tile count and marks the weights'
    gradients ready for ZeRO at the last one; torch.chunk can return fewer pieces than asked
    (49 tokens in 8: 7 pieces of 7), and then no piece is the last, ZeRO never reduces the MLP's
    gradients, and they are silently lost."""
    step = -(-tokens // min(tiles, tokens))
    return -(-tokens // step)


class SequenceTiledMLP(torch.autograd.Function):
    """The tiled MLP where DeepSpeed is not installed (engine: fsdp2 on a machine without it): the
    same computation as DeepSpeed's TiledMLP, whose ZeRO flags have no reader then. Forward runs the
    MLP tile by tile without keeping anything but its input; backward recomputes each tile and
    backpropagates the incoming gradient's rows, the input's gradient written in place into one
    buffer and the weights' accumulated over the tiles."""

    @staticmethod
    def forward(ctx, fn, module, x, tiles, params):
        ctx.fn, ctx.module, ctx.tiles, ctx.params = fn, module, tiles, [p for p in params if p.requires_grad]
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            return torch.cat([fn(module, piece) for piece in torch.chunk(flat, tiles)]).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        flat, incoming = x.detach().reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        x_grad = torch.zeros_like(flat) if ctx.needs_input_grad[2] else None
        start, pieces = 0, torch.chunk(flat, ctx.tiles)
        for i, piece in enumerate(pieces):
            for p in ctx.params:  # whole at the last tile, under DeepSpeed's name for it (simulate.drop_when_whole)
                p.ds_grad_is_ready = i == len(pieces) - 1
            rows = piece.shape[0]
            piece = piece.detach().requires_grad_(x_grad is not None)
            if x_grad is not None:
                piece.grad = x_grad.narrow(0, start, rows)  # autograd adds this tile's into it, in place
            with torch.enable_grad():
                out = ctx.fn(ctx.module, piece)
            torch.autograd.backward(out, incoming.narrow(0, start, rows))
            start += rows
        return None, None, None if x_grad is None else x_grad.view_as(x), None, None


def tiled_mlp_function():
    """DeepSpeed's TiledMLP (it tells ZeRO when a weight's gradient is whole), or SequenceTiledMLP
    where DeepSpeed is not installed."""
    try:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP
    except ImportError:
        return SequenceTiledMLP
    return TiledMLP


def tile_mlps(lm: torch.nn.Module, tiles: int) -> int:
    """Run every decoder layer's MLP of `lm` over `tiles` sequence tiles; the number of MLPs."""
    if tiles <= 1:
        return 0
    TiledMLP = tiled_mlp_function()  # noqa: N806 (an autograd Function class)

    mlps = [m.mlp for m in lm.modules() if isinstance(getattr(m, "mlp", None), torch.nn.Module)]
    if not mlps:
        raise BadValue(
            f"mlp_tiles: {tiles}, but {type(lm).__name__} has no decoder layers with an `mlp`; set mlp_tiles: 1"
        )
    for mlp in mlps:
        missing = [name for name in GATED if not isinstance(getattr(mlp, name, None), torch.nn.Module)]
        if missing:
            raise BadValue(
                f"mlp_tiles: {tiles}, but {type(mlp).__name__} is not a gated MLP (no {', '.join(missing)}): only "
                "per-token MLPs (Llama, Mistral, Qwen) can be tiled exactly; set mlp_tiles: 1"
            )
        untiled = type(mlp).forward

        def forward(self, x, _untiled=untiled):
            # the same on every rank: the ring's parts of a batch have one length
            n = tile_count(x.numel() // x.shape[-1], tiles)
            return TiledMLP.apply(_untiled, self, x, n, list(self.parameters()))

        mlp.forward = types.MethodType(forward, mlp)
    return len(mlps)


class MLPTiles(Switch):
    key = "mlp_tiles"
    annotation = Annotated[int, POSITIVE]
    default = 1
    doc = (
        "Run each layer's MLP over this many sequence tiles, recomputed tile by tile in backward "
        "(ringpatch/plan/switches/mlp_tiles.py): its peak falls by this factor, for one more MLP forward."
    )
    usage = "N"
    does = "the MLP over N sequence tiles, recomputed tile by tile"
    costs = "one more MLP forward"

    def check_model(self, recipe, model_config: dict) -> None:
        self.check_model_type(recipe, model_config, GATED_MLP_MODEL_TYPES, "tiles the per-token gated MLP")

    def apply(self, recipe, lm) -> dict:
        tile_mlps(lm, recipe.mlp_tiles)
        return {}

    def layer_flags(self, recipe) -> dict:
        # ZeRO reduces a tiled weight's gradient after the last tile: until then it is whole
        return {"tiles": recipe.mlp_tiles, "tile_grads": recipe.mlp_tiles > 1 and recipe.zero.stage > 0}

    def plan_words(self, recipe) -> str:
        return f", MLP over {recipe.mlp_tiles} sequence tiles" if recipe.mlp_tiles > 1 else ""

    def remedy(self, recipe, item: Item) -> str | None:
        if item is Item.MLP_BACKWARD:
            return f"mlp_tiles: {recipe.mlp_tiles * 4} (and more ranks, parallel.sp)"
        return None


MLP_TILES = MLPTiles()
