"""One Trainer run on a tiny Llama (launched by tests/integrations/test_trainer.py): RingTrainer
over sp ranks, or (--plain) the stock transformers.Trainer on one process, unpatched. Writes the
log history (losses, grad norms, eval loss) as JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    LlamaConfig,
    Trainer,
    TrainingArguments,
)

from ringpatch.data.tokenizer import byte_tokenizer  # noqa: E402
from ringpatch.integrations.trainer import RingTrainer  # noqa: E402
from ringpatch.parallel import leave  # noqa: E402


def data(n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(40, 65, (n,), generator=g).tolist()  # right padding in most batches
    return Dataset.from_dict({"input_ids": [torch.randint(0, 256, (k,), generator=g).tolist() for k in lengths]})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--sp", type=int, default=1)
    p.add_argument("--ulysses", type=int, default=1)
    p.add_argument("--ga", type=int, default=1)
    p.add_argument("--plain", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--deepspeed")
    p.add_argument("--no-use-cpu", action="store_true", help="TrainingArguments without use_cpu (a user's slip)")
    a = p.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    args = TrainingArguments(
        output_dir=str(Path(a.out).parent / "trainer"), per_device_train_batch_size=2, per_device_eval_batch_size=2,
        gradient_accumulation_steps=a.ga, max_steps=3, learning_rate=1e-3, logging_steps=1, report_to=[],
        use_cpu=not a.no_use_cpu, seed=0, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, bf16=a.bf16,
        deepspeed=a.deepspeed, include_num_input_tokens_seen="non_padding",
    )  # fmt: skip
    kwargs = dict(model=model, args=args, train_dataset=data(24, 1), eval_dataset=data(7, 2),
                  data_collator=DataCollatorForLanguageModeling(byte_tokenizer(), mlm=False))  # fmt: skip
    trainer = Trainer(**kwargs) if a.plain else RingTrainer(**kwargs, sp=a.sp, ulysses=a.ulysses)
    trainer.train()
    history = trainer.state.log_history + [
        trainer.evaluate(),
        {"total_batch": trainer.get_total_train_batch_size(args)},
    ]
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(a.out).write_text(json.dumps(history))
    del trainer  # before the groups go (pytorch/pytorch#56297)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave(0)  # as ringpatch's commands end: gloo's finalization race aborts 1 complete run in ~190 (pytorch#190489)
