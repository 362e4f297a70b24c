"""Perplexity vs context length: the loss of the same last tokens seen with longer and longer contexts."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Annotated

import torch

from ringpatch.attention.layout import DEFAULT_LAYOUT, Layout
from ringpatch.data.packing import restart_first_document
from ringpatch.errors import BadValue
from ringpatch.evaluate.heldout import held_out
from ringpatch.evaluate.prefill import ring_prefill_scores
from ringpatch.evaluate.report import check_increasing, format_table, pyplot, write_rows
from ringpatch.evaluate.task import EvalTask
from ringpatch.schema import POSITIVE, Key


def perplexity_by_length(
    model,
    sequences: torch.Tensor,
    lengths,
    last_tokens: int,
    group=None,
    layout: Layout = DEFAULT_LAYOUT,
    positions=None,
) -> dict[int, float]:
    """Mean loss of the same last `last_tokens` tokens of each sequence, seen with a context of
    each length (the context ends where the sequence ends). `positions`: the sequences' document
    positions (restarting at 0 per document) to keep documents apart, as training with
    data.document_masking does; a context that starts inside a document starts it afresh."""
    losses = {}
    for n in lengths:
        ctx = sequences[:, -n:]  # (B, n)
        ctx_pos = None if positions is None else restart_first_document(positions[:, -n:])
        scored = torch.arange(n - last_tokens - 1, n - 1, device=ctx.device)
        nll, _ = ring_prefill_scores(model, ctx, scored, group, layout, position_ids=ctx_pos)
        losses[n] = nll.mean().item()
    return losses


def plot_perplexity(losses: dict[str, dict[int, float]], path) -> None:
    plt = pyplot()

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


class Perplexity(EvalTask):
    name = "perplexity"
    keys = (
        Key("ppl_lengths", Annotated[tuple[int, ...], POSITIVE], (),
            "Context lengths for perplexity-vs-length (empty: powers of two from 256 up to the last stage)."),
        Key("ppl_tokens", Annotated[int, POSITIVE], 64,
            "Perplexity is measured on the last this-many tokens of each context (the same tokens at every length)."),
    )  # fmt: skip

    def check_spec(self, spec) -> None:
        if any(n <= spec.ppl_tokens for n in spec.ppl_lengths):
            raise BadValue(
                f"eval.ppl_lengths {list(spec.ppl_lengths)} must all exceed eval.ppl_tokens {spec.ppl_tokens}"
            )
        check_increasing("eval.ppl_lengths", spec.ppl_lengths)

    def add_flags(self, parser) -> None:
        parser.add_argument(
            "--ppl-lengths",
            type=int,
            nargs="+",
            metavar="N",
            help="context lengths for perplexity vs length, on the held-out data of --data or the recipe "
            "(default: the recipe's eval.ppl_lengths; without a recipe, none)",
        )

    def changes(self, args) -> dict:
        return {} if args.ppl_lengths is None else {"ppl_lengths": tuple(args.ppl_lengths)}

    def complete(self, spec, recipe, data_spec):
        if spec.ppl_lengths and data_spec is None:
            raise BadValue(
                f"perplexity at {list(spec.ppl_lengths)} needs held-out documents: give --data FILE (or a recipe "
                "with data.eval_source), or leave --ppl-lengths out"
            )
        if spec.ppl_lengths or recipe is None:
            return spec
        top = recipe.stages[-1].seq_len
        return dataclasses.replace(spec, ppl_lengths=tuple(2**k for k in range(8, 40) if 2**k <= top) or (top,))

    def enabled(self, spec, data_spec) -> bool:
        return data_spec is not None and bool(spec.ppl_lengths)

    def lengths(self, spec) -> tuple[int, ...]:
        return spec.ppl_lengths

    def prefills(self, spec, data_spec) -> list[tuple[int, int]]:
        return [(n, data_spec.eval_samples) for n in spec.ppl_lengths]

    def run(self, model, tokenizer, spec, data_spec, layout, device):
        sequences, positions = held_out(data_spec, tokenizer, max(spec.ppl_lengths), data_spec.eval_samples, device)
        losses = perplexity_by_length(
            model, sequences, spec.ppl_lengths, spec.ppl_tokens, None, layout, positions=positions
        )
        return {"losses": losses, "samples": len(sequences)}

    def report(self, results: dict, spec, out: Path) -> None:
        labels = list(results)
        samples = {m: results[m]["samples"] for m in labels}
        counted = ", ".join(f"{m}: {k} x {spec.ppl_tokens} = {k * spec.ppl_tokens:,}" for m, k in samples.items())
        print(
            f"\nloss of the last {spec.ppl_tokens} tokens (nats; perplexity = e^loss) by context length; "
            f"held-out sequences x tokens scored per length: {counted}"
        )
        losses = {m: results[m]["losses"] for m in labels}
        print(format_table(["length", *labels], [[n, *(losses[m][n] for m in labels)] for n in spec.ppl_lengths]))
        rows = [{"model": m, "length": n, "loss": v, "perplexity": math.exp(v), "samples": samples[m],
                 "tokens": samples[m] * spec.ppl_tokens} for m in labels for n, v in losses[m].items()]  # fmt: skip
        write_rows(rows, out / "perplexity")
        plot_perplexity(losses, out / "perplexity.png")


PERPLEXITY = Perplexity()
