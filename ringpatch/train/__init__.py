"""The recipe trainer: `python -m ringpatch.train --recipe ...` (command.py).

  recipe.py      the recipe schema: YAML validated into frozen dataclasses
  switches/      the memory switches, one module each, and SWITCHES, which the others loop over
  preflight.py   every check before a process group, a model or a download; builds the Plan
                 (ringpatch/plan: the memory plan, its check and the simulated rank)
  ds_config.py   the DeepSpeed config, generated from the recipe once, with tuning overlays
  schedule.py    the learning-rate schedule
  build.py       process groups, model, DeepSpeed engine
  loop.py        the Trainer: stages, steps, evaluation, checkpoints, exports
  metrics.py     metrics.jsonl and wandb
  checkpoint.py  verified checkpoints (manifest, fallback, keep_last), resume rules by recipe key
  lock.py        one run per run_dir
  watchdog.py    heartbeats: which rank went silent when a collective times out
  export.py      a plain Hugging Face folder from a DeepSpeed run

The top layer of the library: nothing below it (attention, parallel, hf, memory,
integrations, data, evaluate) imports it; ringpatch/plan reads its switch registry and its
simulator runs the trainer's model building.
"""
