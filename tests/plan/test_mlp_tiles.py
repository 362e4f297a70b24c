"""The sequence-tiled MLP (recipe mlp_tiles): the loss and every gradient equal the untiled
model's; MLPs that are not per-token are refused; the planner counts the smaller peak."""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytestmark = pytest.mark.unit

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


@pytest.mark.parametrize("implementation", ["deepspeed", "without deepspeed"])
@pytest.mark.parametrize("tiles, checkpointing", [(4, False), (3, True), (64, False)])
def test_a_tiled_mlp_gives_the_untiled_loss_and_gradients(tiles, checkpointing, implementation, monkeypatch):
    from ringpatch.plan.switches import mlp_tiles
    from ringpatch.plan.switches.mlp_tiles import SequenceTiledMLP, tile_mlps

    if implementation == "without deepspeed":
        monkeypatch.setattr(mlp_tiles, "tiled_mlp_function", lambda: SequenceTiledMLP)

    plain = _llama()
    tiled = copy.deepcopy(plain)
    assert tile_mlps(tiled, tiles) == 2
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    for model in (plain, tiled):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(tiled(input_ids=ids, labels=ids).loss, plain(input_ids=ids, labels=ids).loss,
                               rtol=1e-6, atol=0)  # fmt: skip
    for (name, a), b in zip(tiled.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert any("mlp" in n and p.grad.abs().sum() > 0 for n, p in tiled.named_parameters())


def test_the_tile_count_is_what_torch_chunk_cuts():
    """TiledMLP marks the weights' gradients ready for ZeRO at its last tile; a count torch.chunk
    cannot cut (49 tokens in 8 gives 7 pieces) would never mark them, and ZeRO would drop them."""
    from ringpatch.plan.switches.mlp_tiles import tile_count

    for tokens in range(1, 300):
        for tiles in range(1, 20):
            n = tile_count(tokens, tiles)
            assert 1 <= n <= tiles and len(torch.arange(tokens).chunk(n)) == n, (tokens, tiles, n)
    assert tile_count(49, 8) == 7 and tile_count(64, 8) == 8


@pytest.mark.parametrize("implementation", ["deepspeed", "without deepspeed"])
def test_zero_is_told_the_mlp_gradients_are_ready_after_the_last_tile(implementation, monkeypatch):
    from ringpatch.plan.switches import mlp_tiles
    from ringpatch.plan.switches.mlp_tiles import SequenceTiledMLP, tile_mlps

    if implementation == "without deepspeed":
        monkeypatch.setattr(mlp_tiles, "tiled_mlp_function", lambda: SequenceTiledMLP)
    model = _llama()
    tile_mlps(model, 8)
    ids = torch.randint(0, 64, (1, 49), generator=torch.Generator().manual_seed(3))  # 49 tokens: 7 tiles
    model(input_ids=ids, labels=ids).loss.backward()
    flags = {n: p.ds_grad_is_ready for n, p in model.named_parameters() if hasattr(p, "ds_grad_is_ready")}
    assert len(flags) == 6 and all(flags.values()), flags


def test_a_non_gated_mlp_is_refused_with_the_fix():
    from transformers import AutoModelForCausalLM, GPT2Config

    from ringpatch.plan.switches.mlp_tiles import tile_mlps

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match=r"GPT2MLP is not a gated MLP .*set mlp_tiles: 1"):
        tile_mlps(gpt2, 4)
    assert tile_mlps(gpt2, 1) == 0


def test_the_planner_counts_the_tiled_mlp():
    import dataclasses

    from ringpatch.plan.budget import estimate
    from ringpatch.plan.recipe import load_recipe
    from tests.helpers import ROOT

    recipe = load_recipe(ROOT / "recipes" / "llama3-8b-1m.yaml")
    cfg = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256}  # fmt: skip
    from ringpatch.plan.estimate import LayerFlags, layer_backward, shapes
    from ringpatch.plan.items import Item

    tokens = (1 << 20) // recipe.parallel.sp
    s = shapes(cfg, recipe.parallel.tp, recipe.parallel.ulysses, 2)
    args = (tokens, 1, recipe.parallel.sp, recipe.parallel.ulysses)
    off = layer_backward(s, *args, LayerFlags(tiles=1))[Item.MLP_BACKWARD]
    on = layer_backward(s, *args, LayerFlags(tiles=8))[Item.MLP_BACKWARD]
    # the MLP backward's six (tokens x intermediate) bf16 tensors, all or one tile's, against the
    # tiled MLP's input-gradient accumulator and one tile's share of it
    assert off - on == pytest.approx(tokens * (6 * 14336 * 2 * (1 - 1 / 8) - 4096 * 2 * (1 + 1 / 8)), rel=1e-9)
    assert Item.NORM_BACKWARD in estimate(dataclasses.replace(recipe, mlp_tiles=8), cfg, 32, 1 << 20, 1)
    with pytest.raises(ValueError, match="mlp_tiles must be > 0, got 0"):
        dataclasses.replace(recipe, mlp_tiles=0)


def test_the_tiled_forward_keeps_only_the_mlp_input():
    """What autograd keeps for backward: the untiled MLPs keep their gate, up and product
    (3 x tokens x intermediate floats each, and more); the tiled ones keep none of that."""
    from ringpatch.plan.switches.mlp_tiles import tile_mlps

    def kept_bytes(model, ids):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
        return sum(total)

    plain = _llama()
    tiled = copy.deepcopy(plain)
    tile_mlps(tiled, 4)
    ids = torch.randint(0, 64, (1, 256), generator=torch.Generator().manual_seed(2))
    saved = kept_bytes(plain, ids) - kept_bytes(tiled, ids)
    per_layer = 3 * 256 * 96 * 4  # gate, up and their product, float32
    assert saved >= 2 * per_layer, (saved, per_layer)
