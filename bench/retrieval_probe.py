"""Does a model of the demo's size learn retrieval in the demo's budget? A one-process probe.

Trains a Llama built from a config (the demo's by default: 2 layers, hidden 128, byte tokens) on
packed rows, with document masking and positions restarting per document as the trainer packs
them, from a mixture of three kinds of document, drawn per document by share:
  the demo corpus          pass-key documents (ringpatch/data/corpus.py), keys of --key-digits
  --synthetic              RULER-style niah_single training prompts (ringpatch/data/tasks.py, the
                           training half of the words, no opening line), values of --value-digits
  --copy                   a random string of 6-12 letters and digits written 2-5 times between
                           filler sentences: a copy only an induction head predicts
                           (--pure N: the string, of 8-N characters, written twice with only a
                           space between, no filler)
Every --every steps it prints one JSON line: the training loss and three skills, each over 40
held-out prompts of --length tokens, an item counting when every token of it is the argmax:
  passkey      the demo's pass key (chance 10^-key_digits)
  niah_single  the evaluation's single needle, short wording (chance 10^-value_digits)
  niah_train   the same task built from training's half of the words, as --synthetic trains on
  copy         a 10-character string written again after about 30 characters of filler: the
               share of its 9 characters after the first that are predicted (chance about 1/36)
The optimizer and schedule are the recipe's (AdamW, betas 0.9/0.95, 20 warm-up steps, cosine
to 0.1 of the peak). It is not the trainer (no ring, no DeepSpeed): one configuration takes a
few minutes on one core, so several can run side by side.

    python bench/retrieval_probe.py                        # the demo corpus alone, seed 0
    python bench/retrieval_probe.py --copy 1.0 --steps 2000   # copy strings only
    python bench/retrieval_probe.py --save runs/probe          # and keep the model (with its tokenizer)
    python bench/retrieval_probe.py --init runs/probe --synthetic 0.5   # go on from a saved model

`make demo-base` makes the demo's base model (data/demo-base) with it: 15,000 steps with 30%
niah_single documents, saved only if it finds the pass key (data/demo-base/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import string
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_with_min_lr_schedule_with_warmup

from ringpatch.data import corpus
from ringpatch.data.packing import pack_documents
from ringpatch.data.tasks import Builder, synthetic_documents
from ringpatch.data.tokenizer import byte_tokenizer
from ringpatch.evaluate.passkey import demo_template, passkey_prompt

PROMPTS = 40
SKILLS = ("passkey", "niah_single", "niah_train", "copy")
ALPHABET = string.ascii_lowercase + string.digits  # the copy strings'


def random_string(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500, help="the demo's first stage: 1500")
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--rows", type=int, default=16, help="packed rows per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--length", type=int, default=127, help="tokens of each held-out prompt")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--key-digits", type=int, default=1)
    p.add_argument("--synthetic", type=float, default=0.0, help="share of documents: niah_single prompts")
    p.add_argument("--value-digits", type=int, default=1)
    p.add_argument("--copy", type=float, default=0.0, help="share of documents: repeated random strings")
    p.add_argument("--pure", type=int, default=0, help="copy documents: a string of 8-PURE characters, twice")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--init", help="start from this model folder (a --save of an earlier run) instead of random weights")
    p.add_argument("--save", help="save the trained model and the byte tokenizer here (a folder for init: pretrained)")
    p.add_argument("--require", nargs="+", default=[], metavar="SKILL=MIN",
                   help="fail (saving nothing) unless the last check scores at least MIN on each SKILL (passkey=0.9)")  # fmt: skip
    a = p.parse_args()
    a.require = dict(_requirement(r, p) for r in a.require)
    return a


def _requirement(text: str, parser) -> tuple[str, float]:
    skill, _, least = text.partition("=")
    try:
        value = float(least)
    except ValueError:
        value = None
    if skill not in SKILLS or value is None:
        parser.error(f"--require {text!r}: give SKILL=MIN with SKILL one of {list(SKILLS)} and MIN a number")
    return skill, value


def documents(a, tok, rng: random.Random):
    """Token ids of documents drawn by share, endlessly."""
    synthetic = synthetic_documents(tok, ["niah_single"], a.seq_len, seed=1 + a.seed, digits=a.value_digits,
                                    intro=False)  # fmt: skip
    while True:
        draw = rng.random()
        if draw < a.synthetic:
            yield next(synthetic)
            continue
        if draw < a.synthetic + a.copy:
            if a.pure:
                s = random_string(rng, rng.randint(8, a.pure))
                yield tok(s + " " + s + ". ", add_special_tokens=False)["input_ids"]
                continue
            s = random_string(rng, rng.randint(6, 12))
            text = "".join(corpus.filler(rng, rng.randint(0, 40)) + s + ". " for _ in range(rng.randint(2, 5)))
        else:
            text = corpus.passkey_document(rng, rng.randint(150, 1000), rng.random(), key_length=a.key_digits)
        yield tok(text, add_special_tokens=False)["input_ids"]


def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """(B, 1, n, n) bool: causal, and inside each packed document (positions restart at 0)."""
    doc = torch.cumsum((positions == 0).long(), 1)
    causal = torch.ones(positions.shape[1], positions.shape[1], dtype=torch.bool).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def held_out(a, tok):
    """(passkey prompts, niah_single prompts, copy prompts, niah_single prompts of training's words);
    passkey and copy prompts are (ids, answer spans), the others Prompts."""
    rng = random.Random(12345)
    template = dataclasses.replace(demo_template(), key_length=a.key_digits)
    passkey = []
    for _ in range(PROMPTS):
        ids, n = passkey_prompt(tok, template, a.length, rng.random(), rng)
        passkey.append((ids, [(len(ids) - n, len(ids))]))
    builder = Builder(tok, words="eval", digits=a.value_digits, intro=False)
    niah = [builder.build("niah_single", a.length, rng.random(), rng) for _ in range(PROMPTS)]
    copy = []
    for _ in range(PROMPTS):
        s = random_string(rng, 10)
        ids = torch.tensor(
            tok(corpus.filler(rng, 30) + s + ". " + corpus.filler(rng, 30) + s, add_special_tokens=False)["input_ids"]
        )
        copy.append((ids, [(len(ids) - 9 + i, len(ids) - 8 + i) for i in range(9)]))
    train_words = Builder(tok, words="train", digits=a.value_digits, intro=False)
    niah_train = [train_words.build("niah_single", a.length, rng.random(), rng) for _ in range(PROMPTS)]
    return passkey, niah, copy, niah_train


@torch.no_grad()
def skills(model, passkey, niah, copy, niah_train) -> dict:
    def hits(ids, spans) -> list[bool]:
        predicted = model(ids[None]).logits[0].argmax(-1)
        return [bool((predicted[s - 1 : e - 1] == ids[s:e]).all()) for s, e in spans]

    model.eval()
    out = {
        "passkey": sum(all(hits(ids, spans)) for ids, spans in passkey) / len(passkey),
        "niah_single": sum(all(hits(p.ids, p.items)) for p in niah) / len(niah),  # one item each
        "niah_train": sum(all(hits(p.ids, p.items)) for p in niah_train) / len(niah_train),
        "copy": sum(sum(hits(ids, spans)) for ids, spans in copy) / sum(len(spans) for _, spans in copy),
    }
    model.train()
    return {k: round(v, 3) for k, v in out.items()}


def main():
    a = args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tok = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=a.hidden, intermediate_size=3 * a.hidden,
                         num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=a.seq_len, rope_theta=10000.0, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM.from_pretrained(a.init) if a.init else LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, 20, a.steps, min_lr_rate=0.1)
    rows = pack_documents(documents(a, tok, random.Random(a.seed + 100)), a.seq_len, tok.eos_token_id)
    prompts = held_out(a, tok)
    print(json.dumps({"args": vars(a)}), flush=True)
    started, line = time.perf_counter(), {}
    for step in range(1, a.steps + 1):
        batch = [next(rows) for _ in range(a.rows)]
        ids = torch.tensor([r["input_ids"] for r in batch])
        positions = torch.tensor([r["doc_position_ids"] for r in batch])
        loss = model(input_ids=ids, position_ids=positions, attention_mask=document_mask(positions), labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % a.every == 0 or step == a.steps:
            line = {"step": step, "loss": round(loss.item(), 3), **skills(model, *prompts)}
            print(json.dumps({**line, "s": round(time.perf_counter() - started)}), flush=True)
    short = {k: (line[k], least) for k, least in a.require.items() if line[k] < least}
    if short:
        sys.exit(f"not saved: the last check scored {short} (score, required); train longer or with another seed")
    if a.save:
        model.save_pretrained(a.save)
        tok.save_pretrained(a.save)
        print(json.dumps({"saved": a.save}), flush=True)


if __name__ == "__main__":
    main()
