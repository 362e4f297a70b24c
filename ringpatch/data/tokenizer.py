"""A byte-level tokenizer that needs no download: token id = byte value, plus end-of-text.

Built with `tokenizers` (a BPE model with no merges over GPT-2's byte-to-unicode alphabet) and
wrapped as a PreTrainedTokenizerFast, so it saves beside a model and loads back with
AutoTokenizer.from_pretrained like any other."""

from __future__ import annotations

from ringpatch.errors import BadValue, Missing

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (Radford et al. 2019),
    the alphabet `tokenizers`' ByteLevel pre-tokenizer and decoder use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes, strict=True)}


def byte_tokenizer():
    """A PreTrainedTokenizerFast: ids 0-255 are bytes, 256 is EOS, 257 is padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS, PAD])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


def load_tokenizer(name: str | None, model_name: str):
    """The recipe's tokenizer: "bytes", a hub id or folder, or (None) the model's own."""
    if name == "bytes":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name or model_name)
    if tokenizer.eos_token_id is None:
        raise BadValue(
            f"tokenizer {name or model_name} has no EOS token, which packing puts between documents; "
            "set one (tokenizer.eos_token) or choose another tokenizer"
        )
    return tokenizer


def folder_tokenizer(path: str):
    """The tokenizer saved in model folder `path` (beside the weights, as ringpatch's export and
    save_pretrained write it); a FileNotFoundError naming the folder and the fix when there is none
    transformers can load, whatever the reason it gives (no files, a missing backend). The trainer's
    preflight words the same failure for its recipe keys."""
    from pathlib import Path

    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(": ")
        files = sorted(p.name for p in Path(path).iterdir()) if Path(path).is_dir() else []
        raise Missing(
            f"model folder {path} holds no tokenizer transformers can load ({reason}; the folder has {files}); "
            f"save the model's tokenizer beside it (tokenizer.save_pretrained({str(path)!r}); ringpatch's export "
            "does this)"
        ) from None
