"""Tokenise and pack every stage of a recipe to disk once, before a cluster run.

python data/prepare.py --recipe recipes/llama3-8b-1m.yaml     # same as: ringpatch prepare --recipe ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ringpatch.cli import prepare  # noqa: E402

if __name__ == "__main__":
    sys.exit(prepare(sys.argv[1:]))
