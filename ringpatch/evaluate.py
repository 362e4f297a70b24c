"""Long-context evaluation with ring prefill: perplexity vs context length, and passkey retrieval.

A long prompt is prefilled by ring attention across the ranks of a group (forward only, no
gradients); the model's head runs only at the positions that are scored, on the rank that
holds them, and the scores are summed over the group. So a length that does not fit one
device still evaluates, and every rank ends with the same numbers.

    torchrun --nproc_per_node 2 -m ringpatch.evaluate --recipe recipes/tiny-cpu.yaml
    torchrun --nproc_per_node 8 -m ringpatch.evaluate --model runs/x/final --data held_out.jsonl --ppl-lengths 8192 65536
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ringpatch.layout import Layout, local_positions, num_chunks


def check_lengths(lengths, layout: Layout, ring_size: int, max_tokens_per_rank: int) -> None:
    """Refuse, before any model loads, a length the ring cannot cut or its ranks cannot hold."""
    chunks = num_chunks(layout, ring_size)
    for n in lengths:
        if n % chunks:
            raise ValueError(
                f"evaluation length {n} is not divisible by the {layout} layout's {chunks} chunks over {ring_size} "
                f"ranks; use {n // chunks * chunks} or {-(-n // chunks) * chunks}"
            )
        if n // ring_size > max_tokens_per_rank:
            raise ValueError(
                f"evaluation length {n} puts {n // ring_size} tokens on each of {ring_size} ranks, over "
                f"eval.max_tokens_per_rank {max_tokens_per_rank}; launch more ranks (at least "
                f"{-(-n // max_tokens_per_rank)}) or raise the limit if memory allows"
            )


@torch.no_grad()
def ring_prefill_scores(model, ids: torch.Tensor, scored: torch.Tensor, group=None, layout: Layout = "zigzag"):
    """Next-token scores of a ring-patched causal LM at chosen positions of full sequences.

    ids: (B, S) the same on every rank of `group`; scored: (K,) positions p whose prediction of
    ids[:, p + 1] is wanted. Returns (nll, correct), each (B, K) float32: the negative
    log-likelihood of the true next token and whether it is the argmax (greedy decoding would
    produce it), equal on every rank."""
    sp_size = dist.get_world_size(group) if dist.is_initialized() else 1
    sp_rank = dist.get_rank(group) if dist.is_initialized() else 0
    batch, seq = ids.shape
    pos = local_positions(layout, seq, sp_size, sp_rank, device=ids.device)  # (S_local,) global positions
    local_ids = ids[:, pos]
    where = {p: i for i, p in enumerate(pos.tolist())}
    mine = [(k, where[p]) for k, p in enumerate(scored.tolist()) if p in where]  # (score slot, local index)
    keep = torch.tensor([i for _, i in mine], dtype=torch.long, device=ids.device)
    out = model(input_ids=local_ids, position_ids=pos[None].expand(batch, -1), logits_to_keep=keep, use_cache=False)
    logits = out.logits.float()  # (B, len(mine), V): only the scored positions this rank holds
    nll = torch.zeros(batch, len(scored), device=ids.device)
    correct = torch.zeros(batch, len(scored), device=ids.device)
    if mine:
        slots = torch.tensor([k for k, _ in mine], device=ids.device)
        targets = ids[:, scored[slots] + 1]  # (B, len(mine))
        nll[:, slots] = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        correct[:, slots] = (logits.argmax(-1) == targets).float()
    if sp_size > 1:
        dist.all_reduce(nll, group=group)
        dist.all_reduce(correct, group=group)
    return nll, correct


def perplexity_by_length(model, sequences: torch.Tensor, lengths, last_tokens: int, group=None,
                         layout: Layout = "zigzag") -> dict[int, float]:  # fmt: skip
    """Mean loss of the same last `last_tokens` tokens of each sequence, seen with a context of
    each length (the context ends where the sequence ends)."""
    losses = {}
    for n in lengths:
        ctx = sequences[:, -n:]  # (B, n)
        scored = torch.arange(n - last_tokens - 1, n - 1, device=ctx.device)
        nll, _ = ring_prefill_scores(model, ctx, scored, group, layout)
        losses[n] = nll.mean().item()
    return losses


@dataclass(frozen=True)
class PasskeyTemplate:
    intro: str
    filler: tuple[str, ...]
    needle: str  # with {key}
    question: str
    key_alphabet: str
    key_length: int


# Mohtashami & Jaggi 2023 ("Landmark Attention"), as LongLoRA and EasyContext use it.
CLASSIC = PasskeyTemplate(
    intro="There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there. ",
    filler=("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ",),
    needle="The pass key is {key}. Remember it. {key} is the pass key. ",
    question="What is the pass key? The pass key is ",
    key_alphabet="0123456789",
    key_length=5,
)


def demo_template() -> PasskeyTemplate:
    from ringpatch import corpus

    return PasskeyTemplate(corpus.PASSKEY_INTRO, corpus.FILLER, corpus.passkey_line("{key}"), corpus.PASSKEY_QUESTION,
                           corpus.CODE_LETTERS, 10)  # fmt: skip


def passkey_prompt(tokenizer, template: PasskeyTemplate, length: int, depth: float, rng: random.Random):
    """(ids (length,), number of key tokens at the end): intro, filler, the needle at `depth`
    of the filler, more filler, the question and the key."""
    key = "".join(rng.choice(template.key_alphabet) for _ in range(template.key_length))

    def tok(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    intro, needle = tok(template.intro), tok(template.needle.format(key=key))
    question, answer = tok(template.question), tok(key)
    room = length - len(intro) - len(needle) - len(question) - len(answer)
    if room < 0:
        raise ValueError(f"passkey length {length} is shorter than the prompt without filler ({length - room} tokens)")
    filler: list[int] = []
    while len(filler) < room:
        filler += tok("".join(rng.choice(template.filler) for _ in range(64)))
    before = round(depth * room)
    ids = intro + filler[:before] + needle + filler[before:room] + question + answer
    return torch.tensor(ids), len(answer)


def passkey_accuracy(model, tokenizer, lengths, depths, trials: int, template: PasskeyTemplate, group=None,
                     layout: Layout = "zigzag", seed: int = 0, device=None) -> dict[tuple[int, float], float]:  # fmt: skip
    """Fraction of trials whose key greedy decoding reproduces, per (length, depth). Scored by
    teacher forcing in one prefill: greedy decoding emits the key exactly when every key
    token is the argmax given the prompt and the key tokens before it."""
    accuracy = {}
    for n in lengths:
        for depth in depths:
            rng = random.Random(f"{seed}-{n}-{depth}")
            hits = 0
            for _ in range(trials):
                ids, k = passkey_prompt(tokenizer, template, n, depth, rng)
                scored = torch.arange(n - k - 1, n - 1, device=device)
                _, correct = ring_prefill_scores(model, ids[None].to(device), scored, group, layout)
                hits += int(correct.all().item())
            accuracy[(n, depth)] = hits / trials
    return accuracy


# --- outputs ------------------------------------------------------------------------------------
def write_rows(rows: list[dict], base) -> None:
    """rows as base.csv and base.json."""
    import csv
    import json
    from pathlib import Path

    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    with open(base.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    base.with_suffix(".json").write_text(json.dumps(rows, indent=1))


def format_table(header: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in header]] + [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def plot_perplexity(losses: dict[str, dict[int, float]], path, trained: dict[str, int] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, by_length in losses.items():
        ax.plot(list(by_length), list(by_length.values()), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("loss of the last tokens (nats)")
    ax.set_title("Perplexity vs context length")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_passkey(accuracy: dict[str, dict[tuple[int, float], float]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(accuracy), figsize=(4.6 * len(accuracy) + 1, 3.8), squeeze=False, layout="constrained"
    )
    for ax, (label, cells) in zip(axes[0], accuracy.items(), strict=True):
        lengths = sorted({n for n, _ in cells})
        depths = sorted({d for _, d in cells})
        grid = [[cells[(n, d)] for n in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("key depth")
        ax.set_title(f"passkey: {label}")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the command --------------------------------------------------------------------------------
def _load(path: str, group, layout: Layout, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ringpatch

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return ringpatch.patch_model(model, group=group, layout=layout), AutoTokenizer.from_pretrained(path)


def _held_out(data_spec, tokenizer, length: int, count: int, device) -> torch.Tensor:
    from ringpatch.prepare import prepare_shared

    source = data_spec.eval_source or data_spec.source
    split = data_spec.eval_split if data_spec.eval_source else data_spec.split
    data = prepare_shared(data_spec, source, split, tokenizer, length, "eval")
    return data[: min(count, len(data))]["input_ids"].to(device)  # (count, length)


def evaluate_models(models: dict[str, str], spec, data_spec, out_dir, layout: Layout = "zigzag", device=None,
                    dtype=torch.float32) -> dict:  # fmt: skip
    """Perplexity-vs-length (when data is given) and passkey for each model; tables printed by
    rank 0 and saved as CSV/JSON/PNG in out_dir. Every rank of the default group is one ring."""
    from pathlib import Path

    ring = dist.get_world_size()
    check_lengths([*spec.ppl_lengths, *spec.passkey_lengths], layout, ring, spec.max_tokens_per_rank)
    template = demo_template() if spec.passkey_template == "demo" else CLASSIC
    ppl, passkey = {}, {}
    for label, path in models.items():
        model, tokenizer = _load(path, None, layout, device, dtype)
        if data_spec is not None and spec.ppl_lengths:
            sequences = _held_out(data_spec, tokenizer, max(spec.ppl_lengths), data_spec.eval_samples, device)
            ppl[label] = perplexity_by_length(model, sequences, spec.ppl_lengths, spec.ppl_tokens, None, layout)
        if spec.passkey_lengths:
            passkey[label] = passkey_accuracy(model, tokenizer, spec.passkey_lengths, spec.passkey_depths,
                                              spec.passkey_trials, template, None, layout, device=device)  # fmt: skip
        del model
    if dist.get_rank() == 0:
        _report(ppl, passkey, spec, Path(out_dir))
    dist.barrier()
    return {"ppl": ppl, "passkey": passkey}


def _report(ppl: dict, passkey: dict, spec, out: Path) -> None:  # noqa: F821
    import math

    out.mkdir(parents=True, exist_ok=True)
    if ppl:
        labels = list(ppl)
        print(f"\nloss of the last {spec.ppl_tokens} tokens (nats; perplexity = e^loss) by context length")
        print(format_table(["length", *labels], [[n, *(ppl[m][n] for m in labels)] for n in spec.ppl_lengths]))
        write_rows([{"model": m, "length": n, "loss": v, "perplexity": math.exp(v)} for m in labels
                    for n, v in ppl[m].items()], out / "perplexity")  # fmt: skip
        plot_perplexity(ppl, out / "perplexity.png")
    if passkey:
        for label, cells in passkey.items():
            print(f"\npasskey accuracy, {label} ({spec.passkey_trials} keys per cell; rows: depth, columns: length)")
            rows = [[f"{d:.0%}", *(cells[(n, d)] for n in spec.passkey_lengths)] for d in spec.passkey_depths]
            print(format_table(["depth", *spec.passkey_lengths], rows))
        write_rows([{"model": m, "length": n, "depth": d, "accuracy": v} for m, cells in passkey.items()
                    for (n, d), v in cells.items()], out / "passkey")  # fmt: skip
        plot_passkey(passkey, out / "passkey.png")
    print(f"\nwrote {out}/perplexity.{{csv,json,png}} and passkey.{{csv,json,png}}")


def _spec_and_models(args):
    """The EvalSpec, data and models from --recipe and/or the flags (flags win)."""
    import dataclasses
    from pathlib import Path

    from ringpatch.recipe import DataSpec, EvalSpec, load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else None
    spec = recipe.eval if recipe else EvalSpec()
    data_spec = recipe.data if recipe else None
    if args.data:
        data_spec = DataSpec(source=args.data, eval_source=args.data, eval_samples=args.samples or 4)
    elif data_spec is not None and args.samples:
        data_spec = dataclasses.replace(data_spec, eval_samples=args.samples)
    changes = {k: tuple(v) for k, v in (("ppl_lengths", args.ppl_lengths), ("passkey_lengths", args.passkey_lengths),
                                          ("passkey_depths", args.depths)) if v}  # fmt: skip
    if args.trials:
        changes["passkey_trials"] = args.trials
    if args.passkey_template:
        changes["passkey_template"] = args.passkey_template
    spec = dataclasses.replace(spec, **changes)
    if not spec.ppl_lengths and recipe:
        top = recipe.stages[-1].seq_len
        spec = dataclasses.replace(spec, ppl_lengths=tuple(2**k for k in range(8, 40) if 2**k <= top) or (top,))
    if not spec.passkey_lengths:
        spec = dataclasses.replace(spec, passkey_lengths=spec.ppl_lengths)
    if args.model:
        models = {Path(m).name: m for m in args.model}
    elif recipe:
        run = Path(recipe.run_dir)
        names = [f"stage{i}" for i in range(len(recipe.stages) - 1)] + ["final"]
        models = {n: str(run / n) for n in names if (run / n / "config.json").is_file()}
        if not models:
            raise FileNotFoundError(f"{run} holds no exported model yet ({names}); train first or pass --model")
    else:
        raise ValueError("give --recipe (its run's exported models) or --model PATH [PATH ...]")
    out = args.out or (str(Path(recipe.run_dir) / "eval") if recipe else "runs/eval")
    return spec, data_spec, models, out, (recipe.parallel.layout if recipe else args.layout)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    import sys

    from ringpatch.preflight import USER_ERRORS, single_process_env

    parser = argparse.ArgumentParser(prog="ringpatch eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", help="evaluate this recipe's exported models on its eval data and settings")
    parser.add_argument("--model", nargs="+", help="model folders (side by side), e.g. the base and the extended one")
    parser.add_argument("--data", help="held-out documents (json/jsonl/parquet/txt) for perplexity-vs-length")
    parser.add_argument("--ppl-lengths", type=int, nargs="+")
    parser.add_argument("--passkey-lengths", type=int, nargs="+")
    parser.add_argument("--depths", type=float, nargs="+")
    parser.add_argument("--trials", type=int)
    parser.add_argument("--samples", type=int, help="held-out sequences for perplexity")
    parser.add_argument("--passkey-template", choices=["classic", "demo"])
    parser.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    parser.add_argument("--out", help="output folder (default: run_dir/eval)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        spec, data_spec, models, out, layout = _spec_and_models(args)
        ring = int(os.environ.get("WORLD_SIZE", "1"))  # before any group or model: lengths the ring can take
        check_lengths([*spec.ppl_lengths, *spec.passkey_lengths], layout, ring, spec.max_tokens_per_rank)
    except USER_ERRORS as e:
        print(f"ringpatch eval: {e}", file=sys.stderr)
        return 2
    single_process_env()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        evaluate_models(models, spec, data_spec, out, layout, device=torch.device("cuda" if cuda else "cpu"),
                        dtype=torch.bfloat16 if cuda else torch.float32)  # fmt: skip
    except USER_ERRORS as e:
        print(f"ringpatch eval (rank {dist.get_rank()}): {e}", file=sys.stderr, flush=True)
        os._exit(1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
