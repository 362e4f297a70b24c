"""uncheckpointed_layers: exact, fewer layer forwards, counted by the planner as the simulated rank
holds it, and refused where it cannot apply."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers.trainrun import recipe

CFG = {"model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 352,
       "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
       "max_position_embeddings": 8192, "tie_word_embeddings": False}  # fmt: skip


def _plan(tmp_path, data, **switches):
    from ringpatch.plan.preflight import preflight

    path = recipe(tmp_path, data, parallel__sp=2, model__config=CFG, stages=[{"seq_len": 8192, "steps": 1}],
                  micro_batch=1, loss_chunk_tokens=1024, **switches)  # fmt: skip
    return preflight(str(path), world=2)


@pytest.mark.unit
@pytest.mark.parametrize("n", [1, 2])
def test_the_first_layers_keep_their_activations_and_give_the_same_loss_and_gradients(n):
    """Against every layer checkpointed: equal loss and gradients; each uncheckpointed layer runs
    its forward once per step instead of twice."""
    from types import SimpleNamespace

    from ringpatch.plan.model import lm_from_config
    from ringpatch.plan.switches import apply

    def run(uncheckpointed):
        torch.manual_seed(0)
        lm = lm_from_config(CFG, bf16=False)
        lm.train()
        r = SimpleNamespace(activation_checkpointing=True, activation_offload=False, keep_attention=False,
                            mlp_tiles=1, rmsnorm="stock", uncheckpointed_layers=uncheckpointed)  # fmt: skip
        apply(r, lm)
        calls = [0] * CFG["num_hidden_layers"]
        for i, layer in enumerate(lm.model.layers):  # counted in forward (a recompute skips module hooks)
            layer.mlp.forward = counted(layer.mlp.forward, calls, i)
        ids = torch.randint(0, CFG["vocab_size"], (1, 256), generator=torch.Generator().manual_seed(1))
        loss = lm(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in lm.named_parameters()}, calls

    def counted(forward, calls, i):
        def wrapped(*args, **kwargs):
            calls[i] += 1
            return forward(*args, **kwargs)

        return wrapped

    loss0, grads0, calls0 = run(0)
    loss, grads, calls = run(n)
    assert calls0 == [2, 2, 2]
    assert calls == [1] * n + [2] * (3 - n)
    torch.testing.assert_close(loss, loss0, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads0[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.unit
def test_a_layer_without_the_checkpointing_flag_is_refused_not_ignored():
    from types import SimpleNamespace

    from ringpatch.plan.switches.uncheckpointed import UNCHECKPOINTED_LAYERS

    decoder = SimpleNamespace(layers=[torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    lm = SimpleNamespace(get_decoder=lambda: decoder)
    with pytest.raises(NotImplementedError, match="uncheckpointed_layers: 1, but Linear has no gradient_checkpointing"):
        UNCHECKPOINTED_LAYERS.apply(SimpleNamespace(uncheckpointed_layers=1), lm)


@pytest.mark.multiprocess
def test_the_planner_counts_what_the_simulated_rank_holds(tmp_path, data):
    """The plan's item for 2 uncheckpointed layers of 3 is what they add to the simulated rank's
    peak (2 ranks at 8,192 tokens, float32), within 5%; the plan names the switch."""
    from ringpatch.plan.budget import describe, estimate
    from ringpatch.plan.estimate import GIB
    from ringpatch.plan.items import Item
    from ringpatch.plan.simulate import simulate

    base, two = _plan(tmp_path, data), _plan(tmp_path, data, uncheckpointed_layers=2)
    grown = simulate(two, kernel="cpu").total_peak - simulate(base, kernel="cpu").total_peak
    item = estimate(two.recipe, two.model_config, 2, 8192, 1, bf16=False)[Item.UNCHECKPOINTED]
    assert item * GIB > 4 * 2**20  # a real amount: 2 layers x 4,096 tokens
    assert item == pytest.approx(grown, rel=0.05), (item, grown)
    assert "the first 2 layers not checkpointed" in describe(two)


@pytest.mark.unit
@pytest.mark.parametrize(
    "changes, expected",
    [
        (dict(uncheckpointed_layers=1, activation_checkpointing=False),
         "uncheckpointed_layers: 1 leaves layers out of activation checkpointing, but activation_checkpointing is false"),
        (dict(uncheckpointed_layers=1, keep_attention=True),
         "uncheckpointed_layers: 1 with keep_attention: true"),
        (dict(uncheckpointed_layers=-1), "uncheckpointed_layers must be >= 0, got -1"),
        (dict(uncheckpointed_layers=3),
         "uncheckpointed_layers: 3, but tiny has 3 decoder layers: leave at least one checkpointed (at most 2)"),
    ],
)  # fmt: skip
def test_what_it_cannot_apply_to_is_refused_before_start(tmp_path, data, changes, expected):
    with pytest.raises(ValueError) as caught:
        _plan(tmp_path, data, **changes)
    assert str(caught.value).startswith(expected), caught.value


@pytest.mark.unit
def test_a_checkpoint_resumes_under_another_value():
    """It changes only what is recomputed, not what a step computes: not fixed on resume, unlike
    activation_checkpointing."""
    from ringpatch.train.checkpoint import FIXED

    assert "uncheckpointed_layers" not in FIXED and "activation_checkpointing" in FIXED


@pytest.mark.unit
def test_the_recipe_schema_lists_it_with_its_default_and_description():
    from ringpatch.plan.recipe import Recipe
    from ringpatch.schema import schema_rows

    rows = {row[0]: row for row in schema_rows(Recipe)}
    key, kind, default, rule, doc = rows["uncheckpointed_layers"]
    assert (kind, default, rule) == ("int", "0", ">= 0") and doc.startswith("The first N decoder layers")
    assert dataclasses.fields(Recipe)[[f.name for f in dataclasses.fields(Recipe)].index("grad_accum") + 1].name == (
        "activation_checkpointing"
    )
