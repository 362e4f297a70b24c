"""Data preparation over N processes (data.num_proc) against the tokenizer's own throughput on
the same text.

A generated corpus of plain words (no download) and a byte-level BPE trained on part of it (the
GPT-2 kind). Printed, side by side in one run: the tokenizer alone in one process, with its own
threads (TOKENIZERS_PARALLELISM, the fast tokenizers' default) and on one thread; then the
streamed and the non-streamed preparation (tokenise, filter, pack, write) at num_proc 1 and N,
in tokens/s, tokens/s per core of the machine (num_proc 1 uses every core too: the tokenizer's own
threads), and that per-core rate as a fraction of the one-thread tokenizer's. Every
preparation is checked to give the same sequences as num_proc 1.

    python bench/prepare.py                 # ~12M tokens, num_proc 1 and 2
    python bench/prepare.py --docs 2000     # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.targets import Verdicts  # noqa: E402

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which time "
         "river mountain letter window garden thirty seven evening morning quietly remembered").split()  # fmt: skip


def corpus(folder: Path, docs: int) -> list[str]:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) + (str(rng.randrange(1000)) if rng.random() < 0.05 else "")
                      for _ in range(rng.randrange(500, 6000))) for _ in range(docs)]  # fmt: skip
    with open(folder / "docs.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return texts


def tokenizer_rate(tokenizer, texts: list[str], threads: bool) -> tuple[int, float]:
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads else "false"
    started, n = time.perf_counter(), 0
    for i in range(0, len(texts), 256):
        n += sum(map(len, tokenizer(texts[i : i + 256], add_special_tokens=False)["input_ids"]))
    return n, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=8000)
    parser.add_argument("--procs", type=int, default=2)
    args = parser.parse_args()
    from ringpatch.data.prepare import load_prepared, prepare_split
    from ringpatch.plan.recipe import DataSpec, from_dict
    from tests.helpers.bpe import train_bpe

    folder = Path(tempfile.mkdtemp(prefix="ringpatch-prepare-"))
    try:
        texts = corpus(folder, args.docs)
        tokenizer = train_bpe(texts[:300], vocab_size=2000)
        cores = len(os.sched_getaffinity(0))
        print(f"{args.docs} documents, {sum(map(len, texts)) / 1e6:.0f} M characters, {cores} cores")
        n, threaded = tokenizer_rate(tokenizer, texts, threads=True)
        _, single = tokenizer_rate(tokenizer, texts, threads=False)
        base = n / single
        print(f"tokenizer alone, own threads: {n / threaded:12,.0f} tokens/s ({n:,} tokens)")
        print(f"tokenizer alone, one thread:  {base:12,.0f} tokens/s  (the per-core reference)")
        os.environ.pop("TOKENIZERS_PARALLELISM")
        print("mode        num_proc   tokens/s   per core   vs one-thread tokenizer   same sequences")
        same = []
        for streaming in (True, False):
            reference = None
            for procs in (1, args.procs):
                spec = from_dict(DataSpec, {"source": str(folder / "docs.jsonl"), "streaming": streaming,
                                            "num_proc": procs, "cache_dir": str(folder / f"c-{streaming}-{procs}")},
                                 "data")  # fmt: skip
                started = time.perf_counter()
                data = load_prepared(prepare_split(spec, spec.source, "train", tokenizer, 4096))
                seconds = time.perf_counter() - started
                ids = data[:]["input_ids"].numpy().tobytes()
                reference = reference or ids
                tokens = data.num_rows * 4096
                used = cores
                print(
                    f"{'streamed' if streaming else 'arrow':<10}  {procs:>8}  {tokens / seconds:9,.0f}  "
                    f"{tokens / seconds / used:9,.0f}  {tokens / seconds / used / base:24.2f}   {ids == reference}"
                )
                same.append(ids == reference)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    verdicts = Verdicts()
    verdicts.check("prepare.same_sequences", sum(same) / len(same))
    return verdicts.exit_code()


if __name__ == "__main__":
    sys.exit(main())
