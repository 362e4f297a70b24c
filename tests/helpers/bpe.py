"""A GPT-2-style byte-level BPE trained here (no download): words and numbers carry the space
before them (" 3", " magic"), as in GPT-2's and Llama-3's tokenizers."""

from __future__ import annotations


def train_bpe(lines, vocab_size: int = 600):
    """A PreTrainedTokenizerFast trained on `lines`, with EOS "<eos>"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])  # fmt: skip
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
