"""The demo's pretrained model (data/demo-base) is pinned and does what the demo's figures rest on:
it finds the pass key at the length it was trained at and not at the demo's longer lengths, so the
extension is what makes the difference (data/demo-base/README.md says how it was made)."""

import hashlib
import json

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.unit

BASE = ROOT / "data" / "demo-base"
PINNED = "42d40199dd5936df4473d0676c6bfd137d19699465d98987cedfc229a9d7124f"  # model.safetensors


def test_demo_base_weights_are_pinned():
    digest = hashlib.sha256((BASE / "model.safetensors").read_bytes()).hexdigest()
    assert digest == PINNED, (
        "data/demo-base/model.safetensors changed: the demo's measured figures no longer describe it; rerun "
        "`make demo` and bench/demo_seeds.py, update README, docs/measurements.md and data/demo-base/README.md, "
        "then this pin"
    )


def test_demo_base_is_what_the_demo_recipe_extends():
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes" / "tiny-cpu.yaml").read_text())
    assert recipe["model"] == {"name": "../data/demo-base", "init": "pretrained", "dtype": "float32"}  # beside it
    assert (ROOT / "recipes" / recipe["model"]["name"]).resolve() == BASE.resolve()
    config = json.loads((BASE / "config.json").read_text())
    assert config["max_position_embeddings"] == 128 and config["rope_parameters"]["rope_theta"] == 10000.0
    assert max(stage["seq_len"] for stage in recipe["stages"]) == 1024


def test_demo_base_finds_the_pass_key_at_128_tokens_and_not_at_512():
    """The shipped tokenizer is ringpatch's byte tokenizer; 8 keys at each of 3 depths, one process."""
    import torch
    from transformers import AutoModelForCausalLM

    from ringpatch.data.tokenizer import byte_tokenizer, folder_tokenizer
    from ringpatch.evaluate.passkey import demo_template, passkey_accuracy

    tok = folder_tokenizer(BASE)
    text = "The pass key=7. Remember it. \n"
    assert tok(text)["input_ids"] == byte_tokenizer()(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
    with torch.no_grad():
        accuracy = passkey_accuracy(model, tok, [128, 512], [0.1, 0.5, 0.9], 8, demo_template())
    at = {n: sum(v for (m, _), v in accuracy.items() if m == n) / 3 for n in (128, 512)}
    assert at[128] >= 0.9 and at[512] <= 0.2, accuracy
