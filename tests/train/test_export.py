"""The exported folder, for every model type the trainer takes (and with every memory switch
applied): it loads with stock transformers (no ringpatch), gives the model's logits, keeps its
config, and a tied head is written once."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.multiprocess

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 64,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
TYPES = {
    "llama": {}, "llama-tied": {"model_type": "llama", "tie_word_embeddings": True}, "mistral": {},
    "qwen2": {}, "qwen3": {}, "gemma": {}, "phi3": {}, "olmo": {}, "starcoder2": {},
    "granite": {}, "smollm3": {}, "llama-every-switch": {"model_type": "llama"}, "qwen3-every-switch": {"model_type": "qwen3"},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128, "n_positions": 64, "bos_token_id": 1,
             "eos_token_id": 2},
}  # fmt: skip


EVERY_SWITCH = {"activation_checkpointing": True, "activation_offload": True, "mlp_tiles": 2, "rmsnorm": "chunked",
                "loss_chunk_tokens": 16}  # fmt: skip
ONE_OF = {"llama": {"keep_attention": True}, "qwen3": {"uncheckpointed_layers": 1}}  # the two exclude each other


def _switched(lm, name: str) -> dict:
    """For an -every-switch case, every memory switch on, applied as the trainer applies them (the
    model then exports what the switches wrapped); the patch_model arguments they ask for."""
    if not name.endswith("every-switch"):
        return {}
    from ringpatch.plan import switches
    from ringpatch.plan.recipe import Recipe, from_dict

    recipe = from_dict(Recipe, {"model": {"name": "x"}, "stages": [{"seq_len": 32, "steps": 1}], **EVERY_SWITCH,
                                **ONE_OF[name.split("-")[0]]})  # fmt: skip
    return switches.apply(recipe, lm)


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("name", list(TYPES))
def test_an_export_loads_without_ringpatch_with_the_models_logits(name, tmp_path, one_rank):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    import ringpatch
    from ringpatch.train.export import export_hf

    extra = dict(TYPES[name])
    model_type = extra.pop("model_type", name)
    config = AutoConfig.for_model(model_type, **({} if model_type == "gpt2" else SMALL), **extra)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (1, 32))
    with torch.no_grad():
        expected = lm(input_ids=ids).logits
    ringpatch.patch_model(lm, group=one_rank, **_switched(lm, name))
    export_hf(SimpleNamespace(module=lm, zero_optimization_stage=lambda: 0, autotp_size=lambda: 1), tmp_path / "out")

    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == model_type and written.get("_attn_implementation") in (None, "sdpa", "eager")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(loaded) is type(lm)
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    assert tied == bool(config.tie_word_embeddings)
    assert keys == {n for n, _ in lm.named_parameters()}, sorted(keys)  # each weight once, a tied head not twice
