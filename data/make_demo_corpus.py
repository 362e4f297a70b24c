"""Write the demo corpus (data/demo/train.jsonl, eval.jsonl): generated, nothing downloaded.

python data/make_demo_corpus.py [--out data/demo]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ringpatch.data.corpus import write_corpus  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "demo"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {write_corpus(args.out, seed=args.seed)}")
