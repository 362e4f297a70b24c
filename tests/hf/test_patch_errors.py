"""What the Hugging Face layer cannot honour raises, naming the model type, the feature and the fix."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    BartConfig,
    BartForConditionalGeneration,
    BloomConfig,
    LlamaConfig,
)

import ringpatch
from ringpatch.hf.interface import IMPLEMENTATION
from ringpatch.hf.models import check_transformers_version
from tests.helpers.models import batch as make_batch
from tests.helpers.models import build, gemma2_config
from tests.helpers.procs import spawn

pytestmark = pytest.mark.unit

TINY = dict(vocab_size=101, hidden_size=32, num_attention_heads=4)


@pytest.mark.parametrize(
    "config, match",
    [
        (lambda: BloomConfig(vocab_size=101, hidden_size=32, n_head=4, n_layer=1), r"'bloom'.*ALiBi"),
        (gemma2_config, r"'gemma2'.*soft-capping \(attn_logit_softcapping=50.0\)"),
        (
            lambda: LlamaConfig(**TINY, intermediate_size=64, num_hidden_layers=1, attention_dropout=0.1),
            r"'llama'.*attention dropout \(attention_dropout=0.1\); set config.attention_dropout = 0.0",
        ),
        (
            lambda: BartConfig(
                vocab_size=101,
                d_model=32,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
            ),  # fmt: skip
            r"'bart'.*encoder-decoder",
        ),
    ],
)
def test_unsupported_models_raise(config, match):
    config = config()
    if config.model_type == "bart":
        model = BartForConditionalGeneration(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(NotImplementedError, match=match):
        ringpatch.patch_model(model)


def test_model_without_position_ids_raises():
    config = BartConfig(vocab_size=101, d_model=32, decoder_layers=1, decoder_attention_heads=4)
    with pytest.raises(NotImplementedError, match=r"'bart' \(BartForCausalLM\) takes no position_ids"):
        ringpatch.patch_model(AutoModelForCausalLM.from_config(config))


def test_bad_arguments_and_double_patch():
    model = build("llama")
    with pytest.raises(ValueError, match=r"unknown layout 'ring'"):
        ringpatch.patch_model(model, layout="ring")
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'"):
        ringpatch.patch_model(model, backend="cuda")
    ringpatch.patch_model(model)
    with pytest.raises(ValueError, match=r"already ring-patched; call ringpatch.unpatch_model"):
        ringpatch.patch_model(model)
    ringpatch.unpatch_model(model)
    with pytest.raises(ValueError, match=r"not ring-patched"):
        ringpatch.unpatch_model(model)


def test_transformers_outside_range():
    check_transformers_version(transformers.__version__)  # the installed one is supported
    for version in ("4.40.0", "6.1.0"):
        with pytest.raises(ImportError, match=rf"supports transformers >=5.0,<6.0; found {version}"):
            check_transformers_version(version)


def test_patched_model_misuse_single_rank():
    model = ringpatch.patch_model(build("llama"))
    full = make_batch()
    local = ringpatch.shard_batch(full)
    with pytest.raises(ValueError, match=r"needs this rank's part of the batch with global position_ids"):
        model(input_ids=full["input_ids"])
    mask4d = torch.ones(2, 1, 38, 38, dtype=torch.bool).tril()
    with pytest.raises(
        NotImplementedError,
        match=r"llama: ring attention cannot honour a custom attention mask of shape \(2, 1, 38, 38\)",
    ):
        model(**local, attention_mask=mask4d)
    with pytest.raises(NotImplementedError, match=r"padding attention_mask reached the ring-patched model"):
        model(**local, attention_mask=torch.zeros_like(local["input_ids"]))
    with pytest.raises(
        NotImplementedError, match=r"use_cache=True .*generate with the model unpatched \(ringpatch.unpatch_model"
    ):
        model(**local, use_cache=True)
    no_count = {k: v for k, v in local.items() if k != "num_items_in_batch"}
    with pytest.raises(ValueError, match=r"num_items_in_batch"):
        model(**no_count)


@pytest.mark.parametrize(
    "batch, exc, match",
    [
        (
            {"labels": torch.zeros(1, 4, dtype=torch.long)},
            ValueError,
            r"batch has no 'input_ids' \(it has \['labels'\]\)",
        ),
        (
            {"input_ids": torch.zeros(1, 4, dtype=torch.long), "pixel_values": torch.zeros(1)},
            ValueError,
            r"does not know the keys \['pixel_values'\]",
        ),
        (
            {"input_ids": torch.zeros(4, dtype=torch.long)},
            ValueError,
            r"input_ids must be an integer tensor \(batch, seq_len\)",
        ),
        (
            {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 3, dtype=torch.long)},
            ValueError,
            r"labels must be a tensor of shape \(1, 4\)",
        ),
        (
            {
                "input_ids": torch.zeros(2, 4, dtype=torch.long),
                "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]),
            },
            ValueError,
            r"rows \[1\] have left or inner padding.*padding_side = 'right'",
        ),
        (
            {"input_ids": torch.zeros(1, 4, dtype=torch.long), "position_ids": torch.tensor([[3, 4, 5, 6]])},
            ValueError,
            r"position_ids row 0 reads \[3, 4, 5\] around index 0: .* offsets and other jumps are not supported",
        ),
        (
            {"input_ids": torch.zeros(1, 4, dtype=torch.long), "position_ids": torch.tensor([[0, 2, 1, 3]])},
            ValueError,
            r"position_ids row 0 reads \[0, 2, 1, 3\] around index 1",
        ),
        (
            {
                "input_ids": torch.zeros(1, 4, dtype=torch.long),
                "position_ids": torch.tensor([[0, 1, 0, 1]]),
                "cu_seq_lens_q": torch.tensor([0, 3, 4], dtype=torch.int32),
            },
            ValueError,
            r"position_ids and cu_seq_lens_q place the documents of row 0 differently \(\[0, 2\] vs \[0, 3\]\)",
        ),
        (
            {
                "input_ids": torch.zeros(1, 4, dtype=torch.long),
                "cu_seq_lens_q": torch.tensor([0, 2, 4]),
                "cu_seq_lens_k": torch.tensor([0, 1, 4]),
            },
            ValueError,
            r"cu_seq_lens_q and cu_seq_lens_k differ",
        ),
        (
            {"input_ids": torch.zeros(1, 4, dtype=torch.long), "cu_seq_lens_q": torch.tensor([0, 2, 5])},
            ValueError,
            r"document boundaries \[0, 2, 5\] must run from 0 to 4",
        ),
        (
            {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.full((1, 4), -100)},
            ValueError,
            r"every label of the batch is ignored",
        ),
        ([1, 2, 3], TypeError, r"batch must be a dict of tensors, got list"),
    ],
)
def test_shard_batch_bad_input(batch, exc, match):
    with pytest.raises(exc, match=match):
        ringpatch.shard_batch(batch)


def test_pad_tokens_never_count():
    """Labels left on padding positions are ignored: the loss equals that of -100 labels there."""
    model = ringpatch.patch_model(build("llama"))
    full = make_batch(pad_last_row=6)
    pads = full["attention_mask"] == 0
    labels = full["labels"].clone()
    labels[pads] = full["input_ids"][pads]  # labels not masked at the pads
    careless = dict(full, labels=labels)
    assert model(**ringpatch.shard_batch(careless)).loss.item() == model(**ringpatch.shard_batch(full)).loss.item()


def _check_group_misuse(rank, world):
    model = ringpatch.patch_model(build("llama"))
    full = make_batch(seed=1 + rank)  # a data-loader bug: each rank loads a different sample
    with pytest.raises(ValueError, match=r"hold different batches \(differing: \['input_ids', 'labels'\]\)"):
        ringpatch.shard_batch(full)
    full = make_batch()
    # the full batch on each rank instead of shard_batch's part
    with pytest.raises(ValueError, match=r"not this rank's part \(zigzag, sp_rank \d of 2\)"):
        model(input_ids=full["input_ids"], position_ids=torch.arange(37).expand(2, 37), labels=full["labels"])
    # a different layout than the model was patched for: named, with the fix
    with pytest.raises(ValueError, match=r"the batch was cut with layout 'contiguous', but the model was patched "
                                         r"with layout 'zigzag': pass the same layout to both"):  # fmt: skip
        model(**ringpatch.shard_batch(full, layout="contiguous"))
    # patched balanced, packed documents cut with shard_batch's default zigzag
    balanced = ringpatch.patch_model(build("llama"), layout="balanced")
    packed = dict(make_batch(seq=64), position_ids=torch.cat([torch.arange(40), torch.arange(24)]).expand(2, 64))
    with pytest.raises(ValueError, match=r"cut with layout 'zigzag', but the model was patched with layout 'balanced'"):
        balanced(**ringpatch.shard_batch(packed))


@pytest.mark.multiprocess
def test_group_misuse_raises():
    spawn(_check_group_misuse, 2)


def test_hf_interface_untouched():
    """patch_model adds its own entry and changes no other registry entry."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    before = (dict(AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping))
    ringpatch.patch_model(build("llama"))
    after = (dict(AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping))
    for old, new in zip(before, after, strict=True):
        assert {k: v for k, v in new.items() if k != IMPLEMENTATION} == {
            k: v for k, v in old.items() if k != IMPLEMENTATION
        }
        assert new[IMPLEMENTATION] is not None
