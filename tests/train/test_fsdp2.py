"""engine: fsdp2 without processes: what the recipe refuses, what the plan counts, what resume
holds fixed. The runs themselves (losses equal one process's, resume, export) are in test_train.py."""

from __future__ import annotations

import pytest
import torch
import yaml

from ringpatch.errors import BadValue, Unsupported
from ringpatch.hf.counts import parameters
from ringpatch.plan.budget import budget
from ringpatch.plan.items import Item
from ringpatch.plan.preflight import preflight
from ringpatch.train.checkpoint import recipe_record, resume_changes
from ringpatch.train.fsdp2 import decoder_layers
from tests.helpers.trainrun import recipe

pytestmark = pytest.mark.unit


@pytest.fixture
def data(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "' + "a long enough document " * 40 + '"}\n' * 8)
    (tmp_path / "eval.jsonl").write_text('{"text": "' + "held out text " * 40 + '"}\n' * 2)
    return tmp_path


def _plan(tmp_path, data, world=2, **changes):
    return preflight(str(recipe(tmp_path, data, engine="fsdp2", zero__stage=3, parallel__sp=2, **changes)), world=world)


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"zero__stage": 2}, BadValue, r"engine: fsdp2 shards parameters, .* but zero.stage is 2: set zero.stage: 3"),
        ({"parallel__tp": 2, "zero__stage": 3}, Unsupported, r"engine: fsdp2 with parallel.tp 2: .* AutoTP"),
        (
            {"zero__stage": 3, "deepspeed": "ds.json"},
            BadValue,
            r"deepspeed: .*ds.json is a DeepSpeed config, which "
            r"engine: fsdp2 does not read; remove it",
        ),  # fmt: skip
    ],
    ids=["zero2", "tp2", "deepspeed-file"],
)
def test_what_fsdp2_does_not_run_is_refused(tmp_path, data, changes, error, match):
    (tmp_path / "ds.json").write_text("{}")
    with pytest.raises(error, match=match):
        preflight(str(recipe(tmp_path, data, engine="fsdp2", parallel__sp=2, **changes)), world=4)


def test_a_deepspeed_file_on_the_command_line_is_refused(tmp_path, data):
    (tmp_path / "ds.json").write_text("{}")
    path = recipe(tmp_path, data, engine="fsdp2", zero__stage=3, parallel__sp=2)
    with pytest.raises(BadValue, match=r"--deepspeed .*ds.json with engine: fsdp2, which reads no DeepSpeed config"):
        preflight(str(path), deepspeed_file=str(tmp_path / "ds.json"), world=2)


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_the_plan_counts_fsdp2_states_and_buffers(tmp_path, data, offload):
    """float32 shards (weights, gradients) and AdamW's two moments over every rank, nothing on the
    GPU with offload; a layer's gathered weights (this one's and the prefetched next one's, in the
    compute dtype), its gradient in the compute dtype and in float32 for the reduce-scatter; the
    root's weights through the loss. No DeepSpeed buckets."""
    plan = _plan(tmp_path, data, world=4, zero={"stage": 3, "offload": offload})
    plan = type(plan)(**{**plan.__dict__, "cuda": True, "bf16": True})
    assert plan.ds_config is None
    items = budget(plan, 128, 1).items
    cfg = plan.model_config
    n, _ = parameters(cfg)
    shard = 0 if offload == "cpu" else n / 4 / 2**30
    assert items[Item.WEIGHTS] == pytest.approx(4 * shard) and items[Item.GRADIENTS] == pytest.approx(4 * shard)
    assert items[Item.OPTIMIZER] == pytest.approx(8 * shard)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    d = h // cfg["num_attention_heads"]
    layer = 2 * h * h + 2 * h * cfg["num_key_value_heads"] * d + 3 * h * inter
    assert items[Item.FSDP2_LAYER] == pytest.approx(layer * (2 * 2 + 2 + 4) / 2**30)
    assert items[Item.FSDP2_ROOT] == pytest.approx(2 * cfg["vocab_size"] * h * 2 / 2**30)  # untied: embedding + head
    assert items[Item.FSDP2_ROOT_GRADIENTS] == pytest.approx(cfg["vocab_size"] * h * 2 / 2**30)  # the head's, bf16
    assert not {Item.ZERO_BUCKETS, Item.LAYER_GATHERED, Item.LOSS_GATHERED} & set(items)


def test_the_engine_is_fixed_on_resume(tmp_path, data):
    """A DeepSpeed checkpoint does not load into FSDP2 (nor back); a record from before the key
    existed is DeepSpeed's."""
    fsdp2 = recipe_record(_plan(tmp_path, data).recipe, 2)
    deepspeed = dict(fsdp2, engine="deepspeed")
    with pytest.raises(BadValue, match=r"engine: checkpoint 'deepspeed', recipe 'fsdp2'"):
        resume_changes(deepspeed, fsdp2, 0, 1)
    older = {k: v for k, v in deepspeed.items() if k != "engine"}
    assert resume_changes(older, deepspeed, 0, 1) == {}
    with pytest.raises(BadValue, match=r"engine: checkpoint 'deepspeed', recipe 'fsdp2'"):
        resume_changes(older, fsdp2, 0, 1)


def test_a_model_without_layer_classes_is_refused():
    class Bare(torch.nn.Module):
        _no_split_modules = None

    with pytest.raises(Unsupported, match="Bare names no layer classes"):
        decoder_layers(Bare())


def test_the_shipped_fsdp2_recipe_plans_beside_the_deepspeed_one():
    from ringpatch.plan import for_recipe
    from tests.helpers import ROOT

    raw = yaml.safe_load((ROOT / "recipes" / "llama3-8b-1m-1node-fsdp2.yaml").read_text())
    assert raw["engine"] == "fsdp2" and "deepspeed" not in raw
    fsdp2 = for_recipe(str(ROOT / "recipes" / "llama3-8b-1m-1node-fsdp2.yaml"), nodes=1)
    deepspeed = for_recipe(str(ROOT / "recipes" / "llama3-8b-1m-1node.yaml"), nodes=1)
    a, b = fsdp2.budget(), deepspeed.budget()
    # the same step: activations alike, model states the same 16 bytes per parameter split otherwise
    for item in (Item.MLP_BACKWARD, Item.LOSS_CHUNK, Item.CHECKPOINTED):
        assert a.items[item] == pytest.approx(b.items[item])
    states = (Item.WEIGHTS, Item.GRADIENTS, Item.OPTIMIZER)
    assert sum(a.items[i] for i in states) == pytest.approx(sum(b.items[i] for i in states))


def test_only_a_recipe_that_uses_deepspeed_needs_it(tmp_path, data, monkeypatch):
    """A GPU machine without DeepSpeed trains engine: fsdp2 (MLP tiles included: its own tiled MLP);
    the default engine is refused there naming the install and the other engine."""
    import importlib.util

    from ringpatch.errors import Missing
    from ringpatch.train.extras import check_engine, missing

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else found(name, *a))
    assert "deepspeed" not in missing("train")
    check_engine(_plan(tmp_path, data).recipe)  # fsdp2: no DeepSpeed needed
    check_engine(_plan(tmp_path, data, mlp_tiles=4).recipe)
    default = preflight(str(recipe(tmp_path, data, parallel__sp=2)), world=2).recipe
    with pytest.raises(Missing, match=r"engine: deepspeed \(the default\) needs DeepSpeed.*or set engine: fsdp2"):
        check_engine(default)
