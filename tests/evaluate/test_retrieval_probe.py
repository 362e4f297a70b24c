"""bench/retrieval_probe.py measures what it says: a model that predicts every next token scores
1.0 on each skill and one that always writes the same token scores near 0; its document mask
gives each packed document the logits it has alone."""

from __future__ import annotations

import random
import re
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ringpatch.data import corpus
from ringpatch.data.packing import pack_documents
from ringpatch.data.tokenizer import byte_tokenizer
from tests.helpers import ROOT

pytestmark = pytest.mark.unit

sys.path.insert(0, str(ROOT / "bench"))
import retrieval_probe as probe  # noqa: E402


class Oracle(torch.nn.Module):
    """Logits that put each position's next token first (`wrong`: always token 0)."""

    def __init__(self, wrong: bool = False):
        super().__init__()
        self.wrong = wrong

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, 258)
        if self.wrong:
            logits[..., 0] = 1.0
        else:
            logits[:, :-1].scatter_(-1, ids[:, 1:, None], 1.0)
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("digits", [1, 5])
def test_an_oracle_scores_one_and_a_constant_model_zero(digits):
    a = SimpleNamespace(key_digits=digits, value_digits=digits, length=127)
    prompts = probe.held_out(a, byte_tokenizer())
    skills = probe.SKILLS
    assert probe.skills(Oracle(), *prompts) == dict.fromkeys(skills, 1.0)
    assert probe.skills(Oracle(wrong=True), *prompts) == dict.fromkeys(skills, 0.0)


def test_the_document_mask_keeps_each_document_to_itself():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    rng = random.Random(0)
    docs = [[rng.randrange(256) for _ in range(n)] for n in (10, 20, 31)]  # with their EOS: 64
    row = next(pack_documents(docs, 64, 256))
    ids, positions = torch.tensor([row["input_ids"]]), torch.tensor([row["doc_position_ids"]])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, attention_mask=probe.document_mask(positions)).logits
        at = 0
        for doc in docs:
            alone = model(torch.tensor([doc])).logits
            torch.testing.assert_close(packed[:, at : at + len(doc)], alone, rtol=1e-5, atol=1e-5)
            at += len(doc) + 1  # the EOS after it


def test_pass_keys_of_several_digits():
    text = corpus.passkey_document(random.Random(0), 300, 0.5, key_length=5)
    keys = re.findall(r"key=(\d+)\.", text)
    assert len(keys) >= 4 and len(set(keys)) == 1 and len(keys[0]) == 5, keys


def test_require_saves_only_a_model_that_scores_and_init_goes_on_from_it(tmp_path, monkeypatch, capsys):
    """--require: a model short of the bar is not saved (exit status names the scores); one that
    meets it is saved with its tokenizer, and --init starts a run from it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["retrieval_probe.py", "--steps", "2", "--every", "2", "--rows", "2", *argv])
        probe.main()

    refused, kept = tmp_path / "refused", tmp_path / "kept"
    with pytest.raises(SystemExit, match=r"not saved: the last check scored \{'passkey'"):
        run("--require", "passkey=0.99", "--save", str(refused))
    assert not refused.exists()
    run("--require", "passkey=0", "--save", str(kept))
    model = AutoModelForCausalLM.from_pretrained(kept)
    assert AutoTokenizer.from_pretrained(kept)("a")["input_ids"] == byte_tokenizer()("a")["input_ids"]
    run("--init", str(kept), "--steps", "1", "--every", "1")
    assert model.config.hidden_size == 128 and '"step": 1' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run("--require", "speed=1")
