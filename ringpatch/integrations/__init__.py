"""Glue for training frameworks users already run: transformers.Trainer, TRL, PEFT (to come).

Thin by rule: it builds on ringpatch.hf (patch_model, shard_batch) and ringpatch.parallel (the
grid) and never imports ringpatch.train.
"""
