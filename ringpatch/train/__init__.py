"""The recipe trainer: `python -m ringpatch.train --recipe ...` (command.py).

  recipe.py      the recipe schema: YAML validated into frozen dataclasses
  preflight.py   every check before a process group or a download; builds the Plan
  plan.py        the Plan and its text form (`ringpatch plan`)
  ds_config.py   the DeepSpeed config, generated from the recipe once, with tuning overlays
  schedule.py    the learning-rate schedule
  build.py       process groups, model, DeepSpeed engine
  loop.py        the Trainer: stages, steps, evaluation, checkpoints, exports
  metrics.py     metrics.jsonl and wandb
  checkpoint.py  checkpoints that resume exactly and refuse another recipe's state
  lock.py        one run per run_dir
  export.py      a plain Hugging Face folder from a DeepSpeed run

The top layer of the library: nothing below it (attention, parallel, hf, memory,
integrations, data) imports it.
"""
