"""Glue for training frameworks users already run.

  trainer.py   RingTrainer / RingTrainerMixin: transformers.Trainer over dp x sp, exact loss
               with gradient accumulation, DDP or DeepSpeed ZeRO-2/3; RingSFTTrainer for TRL

Thin by rule: it builds on ringpatch.hf (patch_model, shard_batch) and ringpatch.parallel (the
grid) and never imports ringpatch.train. transformers is imported on first use.
"""

from ringpatch.integrations.trainer import RingSFTTrainerMixin, RingTrainerMixin


def __getattr__(name: str):
    if name in ("RingTrainer", "RingSFTTrainer"):
        from ringpatch.integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(name)


__all__ = ["RingTrainer", "RingSFTTrainer", "RingTrainerMixin", "RingSFTTrainerMixin"]
