"""Passkey retrieval: a key hidden at a depth of filler, asked for at the end, scored by greedy decoding."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch

from ringpatch.attention.layout import DEFAULT_LAYOUT, Layout
from ringpatch.data import corpus
from ringpatch.data.tasks import LANDMARK_FILLER
from ringpatch.errors import BadValue
from ringpatch.evaluate.prefill import ring_prefill_scores
from ringpatch.evaluate.report import check_fractions, check_increasing, format_table, pyplot, write_rows
from ringpatch.evaluate.task import EvalTask
from ringpatch.schema import POSITIVE, Key


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
    filler=(LANDMARK_FILLER,),
    needle="The pass key is {key}. Remember it. {key} is the pass key. ",
    question="What is the pass key? The pass key is ",
    key_alphabet="0123456789",
    key_length=5,
)


def demo_template() -> PasskeyTemplate:
    return PasskeyTemplate(
        corpus.PASSKEY_INTRO,
        corpus.FILLER,
        corpus.passkey_line("{key}"),
        corpus.PASSKEY_QUESTION,
        corpus.KEY_DIGITS,
        1,
    )


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
        raise BadValue(f"passkey length {length} is shorter than the prompt without filler ({length - room} tokens)")
    filler: list[int] = []
    while len(filler) < room:
        filler += tok("".join(rng.choice(template.filler) for _ in range(64)))
    before = round(depth * room)
    ids = intro + filler[:before] + needle + filler[before:room] + question + answer
    return torch.tensor(ids), len(answer)


def passkey_accuracy(
    model,
    tokenizer,
    lengths,
    depths,
    trials: int,
    template: PasskeyTemplate,
    group=None,
    layout: Layout = DEFAULT_LAYOUT,
    seed: int = 0,
    device=None,
) -> dict[tuple[int, float], float]:
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


def plot_passkey(accuracy: dict[str, dict[tuple[int, float], float]], path) -> None:
    plt = pyplot()

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


class Passkey(EvalTask):
    name = "passkey"
    keys = (
        Key("passkey_lengths", Annotated[tuple[int, ...], POSITIVE], (),
            "Prompt lengths for passkey retrieval (empty: the ppl lengths)."),
        Key("passkey_depths", tuple[float, ...], (0.1, 0.3, 0.5, 0.7, 0.9),
            "Where the key sits in the filler, as a fraction of the prompt."),
        Key("passkey_trials", Annotated[int, POSITIVE], 4, "Random keys per (length, depth) cell."),
        Key("passkey_template", Literal["classic", "demo"], "classic",
            "classic: the Landmark Attention prompt (5 digits); demo: the demo corpus's own phrasing."),
    )  # fmt: skip

    def check_spec(self, spec) -> None:
        check_increasing("eval.passkey_lengths", spec.passkey_lengths)
        check_fractions("eval.passkey_depths", spec.passkey_depths)

    def add_flags(self, parser) -> None:
        parser.add_argument(
            "--passkey-lengths",
            type=int,
            nargs="+",
            metavar="N",
            help="prompt lengths for passkey retrieval (default: the recipe's eval.passkey_lengths, else its "
            "ppl lengths; without a recipe, none)",
        )
        parser.add_argument("--depths", type=float, nargs="+", help="passkey depths (default 0.1 0.3 0.5 0.7 0.9)")
        parser.add_argument("--trials", type=int, help="passkey keys per (length, depth) cell (default 4)")
        parser.add_argument(
            "--passkey-template", choices=["classic", "demo"], help="the prompt's phrasing (default classic)"
        )

    def changes(self, args) -> dict:
        found = {
            "passkey_lengths": None if args.passkey_lengths is None else tuple(args.passkey_lengths),
            "passkey_depths": None if args.depths is None else tuple(args.depths),
            "passkey_trials": args.trials,
            "passkey_template": args.passkey_template,
        }
        return {k: v for k, v in found.items() if v is not None}

    def complete(self, spec, recipe, data_spec):
        if spec.passkey_lengths or recipe is None:  # flags alone: only what they ask for
            return spec
        return dataclasses.replace(spec, passkey_lengths=spec.ppl_lengths)

    def lengths(self, spec) -> tuple[int, ...]:
        return spec.passkey_lengths

    def prefills(self, spec, data_spec) -> list[tuple[int, int]]:
        return [(n, 1) for n in spec.passkey_lengths for _ in spec.passkey_depths for _ in range(spec.passkey_trials)]

    def run(self, model, tokenizer, spec, data_spec, layout, device):
        template = demo_template() if spec.passkey_template == "demo" else CLASSIC
        return passkey_accuracy(model, tokenizer, spec.passkey_lengths, spec.passkey_depths, spec.passkey_trials,
                                template, None, layout, device=device)  # fmt: skip

    def report(self, results: dict, spec, out: Path) -> None:
        for label, cells in results.items():
            print(f"\npasskey accuracy, {label} ({spec.passkey_trials} keys per cell; rows: depth, columns: length)")
            rows = [[f"{d:.0%}", *(cells[(n, d)] for n in spec.passkey_lengths)] for d in spec.passkey_depths]
            print(format_table(["depth", *spec.passkey_lengths], rows))
        rows = [{"model": m, "length": n, "depth": d, "accuracy": v} for m, cells in results.items()
                for (n, d), v in cells.items()]  # fmt: skip
        write_rows(rows, out / "passkey")
        plot_passkey(results, out / "passkey.png")


PASSKEY = Passkey()
