"""Stage RoPE: the NTK-aware rule, and a model updated in place equals one built with that RoPE."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from ringpatch.hf.rope import apply_rope, ntk_rope_theta
from tests.helpers.models import CONFIGS, build
from tests.helpers.models import batch as make_batch

pytestmark = pytest.mark.unit


def test_ntk_rule():
    assert ntk_rope_theta(10_000.0, 4096, 4096, 128) == 10_000.0
    assert ntk_rope_theta(10_000.0, 4096, 2048, 128) == 10_000.0  # never shrinks
    # s = 8, d = 128: 10000 * 8 ** (128 / 126)
    assert ntk_rope_theta(10_000.0, 4096, 32768, 128) == pytest.approx(10_000.0 * 8 ** (128 / 126))
    with pytest.raises(ValueError, match=r"even head_dim >= 4; got .*head_dim=3"):
        ntk_rope_theta(1e4, 10, 20, 3)


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral-w20"])
@pytest.mark.parametrize("rope", [dict(rope_theta=5e5), dict(rope_scaling={"rope_type": "linear", "factor": 4.0})])
def test_apply_rope_equals_a_model_built_with_it(name, rope):
    model = build(name)
    apply_rope(model, max_positions=2048, **rope)
    config = copy.deepcopy(CONFIGS[name]())
    params = dict(config.rope_parameters)
    params.update(rope.get("rope_scaling") or {"rope_theta": rope.get("rope_theta")})
    config.rope_parameters = params
    fresh = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    fresh.load_state_dict(model.state_dict())
    full = make_batch()
    torch.testing.assert_close(model(**full).logits, fresh(**full).logits, rtol=1e-6, atol=1e-6)
    before, after = build(name).model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq
    assert not torch.allclose(before, after)  # the RoPE did change
    assert model.config.max_position_embeddings == 2048
    if "rope_theta" in rope:
        assert model.config.rope_parameters["rope_theta"] == 5e5
    else:
        assert model.config.rope_parameters["factor"] == 4.0


def test_apply_rope_refuses_both_rules():
    with pytest.raises(ValueError, match=r"give rope_theta or rope_scaling, not both"):
        apply_rope(build("llama"), 1024, rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 2.0})


def test_the_known_rope_keys_are_transformers_own(monkeypatch):
    """hf/rope.ROPE_TYPE_KEYS, which refuses a misspelt key, lists for each RoPE type exactly the keys
    transformers' validator of that type requires or accepts (beside rope_type, partial_rotary_factor)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import RotaryEmbeddingConfigMixin

    from ringpatch.hf.rope import ROPE_TYPE_KEYS

    class Seen(Exception):
        pass

    seen = {}

    def capture(rope_type, received_keys, required_keys, optional_keys=None, ignore_keys=None):
        seen[rope_type] = set(required_keys) | set(optional_keys or ())
        raise Seen  # the keys are what we came for, not the values' checks after them

    config = LlamaConfig()
    monkeypatch.setattr(RotaryEmbeddingConfigMixin, "_check_received_keys", staticmethod(capture))
    for rope_type, keys in ROPE_TYPE_KEYS.items():
        with pytest.raises(Seen):
            getattr(config, f"_validate_{rope_type}_rope_parameters")({"rope_type": rope_type}, ignore_keys=None)
        assert set(keys) == seen[rope_type] - {"rope_type", "partial_rotary_factor"}, rope_type
