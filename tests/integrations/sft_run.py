"""One TRL SFTTrainer run on a tiny Llama (launched by tests/integrations/test_trainer.py):
RingSFTTrainer over sp ranks, or (--plain) the stock SFTTrainer on one process, unpatched."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from ringpatch.data.tokenizer import byte_tokenizer  # noqa: E402
from ringpatch.integrations.trainer import RingSFTTrainer  # noqa: E402
from ringpatch.parallel import leave  # noqa: E402


def data(n: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    texts = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(20, 60))) for _ in range(n)]
    return Dataset.from_dict({"text": texts})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--sp", type=int, default=1)
    p.add_argument("--plain", action="store_true")
    p.add_argument("--packing", default="none", help="comma-separated: none, wrapped, bfd (one run each)")
    a = p.parse_args()
    histories = {mode: run(a, mode) for mode in a.packing.split(",")}  # one launch, several runs
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(a.out).write_text(json.dumps(histories))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run(a, mode: str) -> list[dict]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=256, pad_token_id=257)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    packing = {} if mode == "none" else {"packing": True, "packing_strategy": mode}
    args = SFTConfig(
        output_dir=str(Path(a.out).parent / f"sft-{mode}"), per_device_train_batch_size=2, per_device_eval_batch_size=2,
        gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-3, logging_steps=1, report_to=[],
        use_cpu=True, seed=0, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, max_length=64,
        bf16=False,  # TRL turns bf16 autocast on by default, CPU included; float32 compares to 1e-5
        **packing,
    )  # fmt: skip
    kwargs = dict(model=model, args=args, train_dataset=data(40, 1), eval_dataset=data(7, 2),
                  processing_class=byte_tokenizer())  # fmt: skip
    trainer = SFTTrainer(**kwargs) if a.plain else RingSFTTrainer(**kwargs, sp=a.sp)
    trainer.train()
    history = trainer.state.log_history + [trainer.evaluate()]
    del trainer  # before the groups go (pytorch/pytorch#56297)
    return history


if __name__ == "__main__":
    main()
    leave(0)  # as ringpatch's commands end: gloo's finalization race aborts 1 complete run in ~190 (pytorch#190489)
