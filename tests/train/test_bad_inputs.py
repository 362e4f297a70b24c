"""Every bad input a careless or hostile user tried, through the real entry points (train, prepare,
eval, plan): each is refused before any process group or model, with exit 2, one message that
names the value, and no traceback."""

from __future__ import annotations

import json
import os
import time

import pytest
import transformers
import yaml

from ringpatch import cli
from ringpatch.evaluate.command import main as eval_main
from ringpatch.plan.reserve import CPU_RUNTIME_GIB
from ringpatch.train.command import main as train_main
from ringpatch.train.lock import LOCK_FILE
from tests.helpers.trainrun import recipe

pytestmark = pytest.mark.unit

BIG = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 16384, "intermediate_size": 53248,
       "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8}  # fmt: skip

# (id, entry, recipe changes (None: no recipe), extra argv, environment, expected message fragment)
# A change's value may name a file the test writes: "@empty", "@short", "@badjson", "@nofield", "@model", ...
CASES = [
    ("unknown-key", "train", {"batch": 4}, [], {}, "unknown keys ['batch']; valid keys are"),
    ("int-as-str", "train", {"micro_batch": "two"}, [], {}, "micro_batch must be int, got str 'two'"),
    ("micro-batch-0", "train", {"micro_batch": 0}, [], {}, "micro_batch must be > 0, got 0"),
    ("grad-accum-neg", "train", {"grad_accum": -1}, [], {}, "grad_accum must be > 0, got -1"),
    ("save-every-neg", "train", {"save_every": -1}, [], {}, "save_every must be >= 0, got -1"),
    ("keep-last-neg", "train", {"keep_last": -1}, [], {}, "keep_last must be >= 0, got -1"),
    ("log-every-0", "train", {"log_every": 0}, [], {}, "log_every must be > 0, got 0"),
    ("loss-chunk-0", "train", {"loss_chunk_tokens": 0}, [], {}, "loss_chunk_tokens must be > 0, got 0"),
    ("mlp-tiles-0", "train", {"mlp_tiles": 0}, [], {}, "mlp_tiles must be > 0, got 0"),
    ("keep-no-ckpt", "train", {"keep_attention": True, "activation_checkpointing": False}, [], {},
     "keep_attention: true keeps attention outputs for the recompute of checkpointed layers, but activation_checkpointing is false"),
    ("offload-no-ckpt", "train", {"activation_offload": True, "activation_checkpointing": False}, [], {},
     "activation_offload: true moves the checkpointed layer inputs to the host, but activation_checkpointing is false"),
    ("mlp-tiles-gpt2", "train", {"mlp_tiles": 4, "model__config__model_type": "gpt2"}, [], {},
     "mlp_tiles: 4 tiles the per-token gated MLP of llama, mistral, qwen2, qwen3; tiny is 'gpt2': set mlp_tiles: 1"),
    ("timeout-0", "train", {"timeout_minutes": 0}, [], {}, "timeout_minutes must be a finite number in [0.1, 10080.0], got 0.0"),
    ("timeout-huge", "train", {"timeout_minutes": 1.0e30}, [], {}, "timeout_minutes must be a finite number in [0.1, 10080.0], got 1e+30"),
    ("name-too-long", "train", {"run_dir": "/tmp/" + "x" * 300}, [], {}, "the path component xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... is 300 bytes"),
    ("plan-memory-inf", "plan", {}, ["--gpu-memory", "inf", "--max-context"], {}, "--gpu-memory must be positive (the memory finite)"),
    ("timeout-nan", "train", {"timeout_minutes": float("nan")}, [], {}, "timeout_minutes must be a finite number in [0.1, 10080.0], got nan"),
    ("lr-nan", "train", {"optim__lr": float("nan")}, [], {}, "optim.lr must be a finite number in (0.0, inf), got nan"),
    ("lr-neg", "train", {"optim__lr": -1e-4}, [], {}, "optim.lr must be a finite number in (0.0, inf), got -0.0001"),
    ("lr-0", "train", {"optim__lr": 0}, [], {}, "optim.lr must be a finite number in (0.0, inf), got 0.0"),
    ("lr-inf", "train", {"optim__lr": float("inf")}, [], {}, "optim.lr must be a finite number in (0.0, inf), got inf"),
    ("wd-neg", "train", {"optim__weight_decay": -0.1}, [], {}, "optim.weight_decay must be a finite number in [0.0, inf), got -0.1"),
    ("beta-1", "train", {"optim__betas": [0.9, 1.0]}, [], {}, "optim.betas[1] must be below 1 (Adam divides by 1 - beta), got 1.0"),
    ("beta-big", "train", {"optim__betas": [1.5, 0.9]}, [], {}, "optim.betas[0] must be a finite number in [0.0, 1.0], got 1.5"),
    ("beta-one-item", "train", {"optim__betas": [0.9]}, [], {}, "optim.betas must have 2 items, got 1"),
    ("warmup-neg", "train", {"optim__warmup_steps": -5}, [], {}, "optim.warmup_steps must be >= 0, got -5"),
    ("min-lr-big", "train", {"optim__min_lr_ratio": 1.5}, [], {}, "optim.min_lr_ratio must be a finite number in [0.0, 1.0], got 1.5"),
    ("min-lr-neg", "train", {"optim__min_lr_ratio": -0.1}, [], {}, "optim.min_lr_ratio must be a finite number in [0.0, 1.0], got -0.1"),
    ("clip-neg", "train", {"optim__grad_clip": -1}, [], {}, "optim.grad_clip must be a finite number in [0.0, inf), got -1.0"),
    ("clip-nan", "train", {"optim__grad_clip": float("nan")}, [], {}, "optim.grad_clip must be a finite number in [0.0, inf), got nan"),
    ("no-stages", "train", {"stages": []}, [], {}, "a recipe needs at least one stage (seq_len, steps)"),
    ("seq-0", "train", {"stages__0__seq_len": 0}, [], {}, "stages[0].seq_len must be > 0, got 0"),
    ("steps-0", "train", {"stages__0__steps": 0}, [], {}, "stages[0].steps must be > 0, got 0"),
    ("shorter-stage", "train", {"stages__1__seq_len": 32}, [], {}, "stages[1].seq_len 32 is shorter than the stage before (64)"),
    ("theta-0", "train", {"stages__1__rope_theta": 0}, [], {}, "stages[1].rope_theta must be a finite number in (0.0, inf), got 0.0"),
    ("theta-neg", "train", {"stages__1__rope_theta": -1e4}, [], {}, "stages[1].rope_theta must be a finite number in (0.0, inf), got -10000.0"),
    ("rope-unknown", "train", {"stages__1__rope_theta": None, "stages__1__rope_scaling": {"rope_type": "magic", "factor": 2}}, [], {},
     "stages[1].rope_scaling.rope_type 'magic' is not one of ['dynamic', 'linear', 'llama3', 'longrope', 'yarn']"),
    ("rope-no-factor", "train", {"stages__1__rope_theta": None, "stages__1__rope_scaling": {"rope_type": "yarn"}}, [], {},
     "stages[1].rope_scaling of rope_type 'yarn' needs ['factor']"),
    ("rope-neg-factor", "train", {"stages__1__rope_theta": None, "stages__1__rope_scaling": {"rope_type": "linear", "factor": -2}}, [], {},
     "stages[1].rope_scaling.factor must be a positive finite number, got -2"),
    ("rope-both", "train", {"stages__1__rope_scaling": {"rope_type": "linear", "factor": 2}}, [], {},
     "stages[1] sets both rope_theta and rope_scaling; choose one rule"),
    ("stage-lr-neg", "train", {"stages__1__lr": -1.0}, [], {}, "stages[1].lr must be a finite number in (0.0, inf), got -1.0"),
    ("stage-mb-0", "train", {"stages__1__micro_batch": 0}, [], {}, "stages[1].micro_batch must be > 0, got 0"),
    ("seq-indivisible", "train", {"parallel__sp": 2, "stages__0__seq_len": 65, "stages__1__seq_len": 128}, [], {},
     "stages[0].seq_len 65 is not divisible by the balanced layout's 16 chunks (sp=2); use 80"),
    ("stage-no-len", "train", {"stages__1": {"steps": 2}}, [], {}, "stages[1]: missing required keys ['seq_len']"),
    ("sp-0", "train", {"parallel__sp": 0}, [], {}, "parallel.sp must be > 0, got 0"),
    ("tp-0", "train", {"parallel__tp": 0}, [], {}, "parallel.tp must be > 0, got 0"),
    ("ulysses-0", "train", {"parallel__ulysses": 0}, [], {}, "parallel.ulysses must be > 0, got 0"),
    ("ulysses-sp", "train", {"parallel__sp": 4, "parallel__ulysses": 3}, [], {"WORLD_SIZE": "4"},
     "parallel.ulysses / parallel.sp: ulysses=3 does not divide the 4 sequence-parallel ranks; choose ulysses among [1, 2, 4]"),
    ("ulysses-heads", "train", {"parallel__sp": 8, "parallel__ulysses": 8}, [], {"WORLD_SIZE": "8"},
     "ulysses=8 does not divide the 4 query heads (per tensor-parallel rank); choose ulysses among [1, 2, 4]"),
    ("ulysses-tp-heads", "train", {"parallel__sp": 4, "parallel__tp": 2, "parallel__ulysses": 4, "zero__stage": 1}, [],
     {"WORLD_SIZE": "8"}, "ulysses=4 does not divide the 2 query heads (per tensor-parallel rank); choose ulysses among [1, 2]"),
    ("ulysses-crosses-node", "train", {"parallel__sp": 4, "parallel__ulysses": 4}, [], {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"},
     "ulysses=4 x tp=1 = 4 neighbouring ranks do not fit evenly in a node of 2 ranks, so some Ulysses all-to-alls would cross nodes; choose ulysses among [1, 2]"),
    ("layout", "train", {"parallel__layout": "diagonal"}, [], {}, "parallel.layout must be one of ['contiguous', 'zigzag', 'balanced'], got 'diagonal'"),
    ("world", "train", {"parallel__sp": 2}, [], {"WORLD_SIZE": "3"}, "world size 3 is not divisible by sp*tp = 2*1 = 2"),
    ("world-no-launcher", "train", {}, [], {"WORLD_SIZE": "2", "no launcher": True},
     "WORLD_SIZE=2 is set but no launcher started this process"),
    ("rank-by-hand", "train", {}, [], {"RANK": "0", "WORLD_SIZE": "1", "no launcher": True},
     "RANK=0, WORLD_SIZE=1 are set but ['LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'] not: every launcher"),
    ("stale-restart-count", "train", {}, [], {"TORCHELASTIC_RESTART_COUNT": "3"},
     "TORCHELASTIC_RESTART_COUNT=3 is set but torchrun's agent did not start this process"),
    ("world-size-text", "train", {}, [], {"WORLD_SIZE": "x"}, "WORLD_SIZE='x' is not an integer >= 1; the launcher"),
    ("local-world-size-zero", "train", {}, [], {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "0"},
     "LOCAL_WORLD_SIZE='0' is not an integer >= 1"),
    ("ranks-over-cores", "train", {}, [], {"WORLD_SIZE": "64", "LOCAL_WORLD_SIZE": "64"},
     "64 ranks were launched on this host, which has no GPU and"),
    ("tp-heads", "train", {"parallel__tp": 3}, [], {"WORLD_SIZE": "3"}, "attention heads 4 are not divisible by tp=3; choose tp among [1, 2]"),
    ("zero-5", "train", {"zero__stage": 5}, [], {}, "zero.stage must be an integer in [0, 3], got 5"),
    ("offload-zero0", "train", {"zero": {"stage": 0, "offload": "cpu"}}, [], {}, "zero.offload: cpu needs zero.stage >= 1"),
    ("tp-zero3", "train", {"parallel__tp": 2, "zero__stage": 3}, [], {"WORLD_SIZE": "2"}, "AutoTP training does not combine with ZeRO-3"),
    ("init", "train", {"model__init": "random"}, [], {}, "model.init must be one of ['pretrained', 'scratch'], got 'random'"),
    ("scratch-no-config", "train", {"model__config": None}, [], {}, "model.init: scratch needs model.config with a model_type"),
    ("scratch-no-tok", "train", {"model__tokenizer": None}, [], {}, "model.init: scratch has no tokenizer of its own"),
    ("config-no-type", "train", {"model__init": "pretrained", "model__config": {"hidden_size": 64}}, [], {},
     "model.config needs a model_type key; it has ['hidden_size']"),
    ("vocab-0", "train", {"model__config__vocab_size": 0}, [], {}, "model.config.vocab_size must be a positive integer, got 0"),
    ("config-theta", "train", {"model__config__rope_theta": -1.0}, [], {}, "model.config.rope_theta must be a finite number in (0.0, inf), got -1.0"),
    ("model-path", "train", {"model": {"name": "./no/such/model"}}, [], {}, "/no/such/model is a local path without config.json"),  # read beside the recipe
    ("dtype", "train", {"model__dtype": "float16"}, [], {}, "model.dtype must be one of ['auto', 'bfloat16', 'float32'], got 'float16'"),
    ("hub-offline", "train", {"model": {"name": "no-org/no-such-model-xyz"}}, [], {"HF_HUB_OFFLINE": "1"},
     "model.name no-org/no-such-model-xyz is neither a local folder nor in the Hugging Face cache, and the hub is offline"),
    ("model-cut-short", "train", {"model__name": "@cutmodel", "model__init": "pretrained", "model__config": None}, [], {},
     "model.safetensors is cut short:"),
    ("model-bad-config", "train", {"model__name": "@badconfig", "model__init": "pretrained", "model__config": None}, [], {},
     "config.json is not valid JSON"),
    ("eval-cut-short", "eval", None, ["--model", "@cutmodel", "--passkey-lengths", "256"], {},
     "model.safetensors is cut short:"),
    ("eval-bad-config", "eval", None, ["--model", "@badconfig", "--passkey-lengths", "256"], {},
     "config.json is not valid JSON"),
    ("model-mismatch", "train", {"model__name": "@model", "model__init": "pretrained"}, [], {},
     "model.config disagrees with"),
    ("vocab-small", "train", {"model__config__vocab_size": 100}, [], {},
     "the tokenizer has 258 tokens but the model's vocab_size is 100"),
    ("tok-offline", "train", {"model__tokenizer": "no-org/no-such-tokenizer"}, [], {"HF_HUB_OFFLINE": "1"},
     "tokenizer no-org/no-such-tokenizer is neither a local folder nor in the Hugging Face cache"),
    ("no-data", "train", {"drop_data": True}, [], {}, "has no data section; training needs data.source"),
    ("data-missing", "train", {"data__source": "/no/such/train.jsonl"}, [], {}, "data.source /no/such/train.jsonl does not exist"),
    ("data-empty", "train", {"data__source": "@empty"}, [], {}, "empty.jsonl'] is empty; remove or fill"),
    ("data-field", "train", {"data__text_field": "body"}, [], {}, "train.jsonl, line 1: the record has no field 'body' (it has ['text']); fix the file or set data.text_field"),
    ("data-short", "train", {"data__source": "@short"}, [], {}, "fewer than the 128 one packed sequence needs"),
    ("data-badjson", "train", {"data__source": "@badjson"}, [], {}, "bad.jsonl, line 2: not valid JSON (Expecting value, column 10)"),
    ("num-proc-0", "train", {"data__num_proc": 0}, [], {}, "data.num_proc must be > 0, got 0"),
    ("eval-samples-0", "train", {"data__eval_samples": 0}, [], {}, "data.eval_samples must be > 0, got 0"),
    ("min-doc-neg", "train", {"data__min_doc_tokens": -1}, [], {}, "data.min_doc_tokens must be >= 0, got -1"),
    ("max-seq-0", "train", {"data__max_sequences": 0}, [], {}, "data.max_sequences must be > 0, got 0"),
    ("eval-is-train", "train", {"data__eval_source": "@trainfile"}, [], {},
     "overlap (both read ['"),
    ("eval-copy-of-train", "train", {"data__eval_source": "@traincopy"}, [], {},
     "has the content of"),
    ("data-fifo", "train", {"data__source": "@fifo"}, [], {}, "fifo is a named pipe, not a file or folder of documents"),
    ("data-loop", "train", {"data__source": "@loop"}, [], {}, "loop-a is a symbolic link that loops back on itself"),
    ("eval-missing", "train", {"data__eval_source": "/no/such/eval.jsonl"}, [], {}, "data.eval_source /no/such/eval.jsonl does not exist"),
    ("data-nofiles", "train", {"data__source": "@nofiles"}, [], {}, "holds no ['.json', '.jsonl', '.parquet', '.txt'] files"),
    ("data-mixed", "train", {"data__source": "@mixed"}, [], {}, "mixes or lacks known file kinds: ['.jsonl', '.txt']"),
    ("ppl-tokens-0", "train", {"eval__ppl_tokens": 0}, [], {}, "eval.ppl_tokens must be > 0, got 0"),
    ("depth", "train", {"eval__passkey_depths": [1.5]}, [], {}, "eval.passkey_depths must be one or more fractions in [0, 1], got [1.5]"),
    ("ppl-short", "train", {"eval__ppl_lengths": [32]}, [], {}, "eval.ppl_lengths [32] must all exceed eval.ppl_tokens 64"),
    ("passkey-order", "train", {"eval__passkey_lengths": [256, 128]}, [], {}, "eval.passkey_lengths must be positive and increasing, got [256, 128]"),
    ("template", "train", {"eval__passkey_template": "fancy"}, [], {}, "eval.passkey_template must be one of ['classic', 'demo'], got 'fancy'"),
    ("wandb", "train", {"wandb": "maybe"}, [], {}, "wandb must be one of ['online', 'offline', 'disabled'], got 'maybe'"),
    ("yaml-dup", "train", "@dupkey", [], {}, "is not valid YAML: key 'micro_batch' is given twice (first on line"),
    ("yaml-bad", "train", "@badyaml", [], {}, "is not valid YAML: expected ',' or ']'"),
    ("recipe-missing", "train", "/no/such/recipe.yaml", [], {}, "recipe /no/such/recipe.yaml does not exist"),
    ("recipe-list", "train", "@list", [], {}, "must be a mapping, got list"),
    ("ds-missing", "train", {}, ["--deepspeed", "/no/ds.json"], {}, "DeepSpeed file /no/ds.json does not exist"),
    ("ds-badjson", "train", {}, ["--deepspeed", "@dsbad"], {}, "is not valid JSON: Expecting"),
    ("ds-dup", "train", {}, ["--deepspeed", "@dsdup"], {}, "keys ['zero_optimization'] are given twice"),
    ("ds-retype", "train", {}, ["--deepspeed", "@dsretype"], {}, "gradient_accumulation_steps = 8 in"),
    ("memory", "train", {"model__config": BIG}, [], {}, f"planned + {CPU_RUNTIME_GIB:.1f} reserve, more than the"),
    ("locked", "train", {}, [], {}, "@locked"),
    ("max-steps-0", "train", {}, ["--max-steps", "0"], {}, "--max-steps must be >= 1, got 0"),
    ("plan-nodes", "plan", {}, ["--nodes", "0"], {}, "--nodes, --gpus-per-node and --gpu-memory must be positive (the memory finite), got 0, 8, 80.0"),
    ("plan-memory", "plan", {"model__config": BIG, "parallel__sp": 8}, [], {}, "GiB of a 80 GiB GPU (--gpu-memory)"),
    ("plan-memory-names", "plan", {"model__config": BIG, "parallel__sp": 8, "stages__1__seq_len": 1048576}, [], {},
     "Largest: weights 1511.9 GiB (try zero.stage: 3); checkpointed activations 1008.1 GiB (try activation_offload: true); "
     "optimizer 378.0 GiB (try zero.offload: optimizer)"),  # the test recipe trains in float32: 4-byte tensors, Adam 8N
    ("plan-ulysses-heads", "plan", {"parallel__sp": 16, "parallel__ulysses": 16, "parallel__layout": "zigzag"},
     ["--nodes", "2"], {}, "ulysses=16 does not divide the 4 query heads"),
    ("plan-ulysses-crosses", "plan", {"parallel__sp": 16, "parallel__ulysses": 4, "parallel__layout": "zigzag"},
     ["--nodes", "8", "--gpus-per-node", "2"], {},
     "ulysses=4 x tp=1 = 4 neighbouring ranks do not fit evenly in a node of 2 ranks"),
    ("plan-host-memory", "plan", {}, ["--host-memory", "0"], {}, "--host-memory must be a positive finite number (GiB per node), got 0.0"),
    ("plan-lr-nan", "plan", {"optim__lr": float("nan")}, [], {}, "optim.lr must be a finite number in (0.0, inf), got nan"),
    ("prepare-no-data", "prepare", {"drop_data": True}, [], {}, "has no data section"),
    ("prepare-empty", "prepare", {"data__source": "@empty"}, [], {}, "empty.jsonl'] is empty"),
    ("prepare-missing", "prepare", {"data__source": "/no/such/train.jsonl"}, [], {}, "data.source /no/such/train.jsonl does not exist"),
    ("eval-trials-neg", "eval", {}, ["--trials", "-2"], {}, "eval.passkey_trials must be > 0, got -2"),
    ("eval-trials-0", "eval", {}, ["--trials", "0"], {}, "eval.passkey_trials must be > 0, got 0"),
    ("eval-depth", "eval", {}, ["--depths", "1.5"], {}, "eval.passkey_depths must be one or more fractions in [0, 1], got [1.5]"),
    ("eval-model", "eval", None, ["--model", "/no/such/model"], {}, "--model ['/no/such/model'] is not a model folder (no config.json)"),
    ("eval-nothing", "eval", None, [], {}, "give --recipe (its run's exported models) or --model PATH"),
    ("eval-data", "eval", None, ["--model", "@model", "--data", "/no/such/held.jsonl"], {}, "--data /no/such/held.jsonl does not exist"),
    ("eval-samples", "eval", None, ["--model", "@model", "--data", "@short", "--samples", "0"], {}, "data.eval_samples must be > 0, got 0"),
    ("eval-length", "eval", None, ["--model", "@model", "--passkey-lengths", "102", "204"], {"WORLD_SIZE": "2"},
     "evaluation length 102 is not divisible by the zigzag layout's 4 chunks over 2 ranks; use 100 or 104"),
    ("eval-no-export", "eval", {}, [], {}, "holds no exported model yet"),
    ("eval-ppl-no-data", "eval", None, ["--model", "@model", "--ppl-lengths", "128"], {},
     "perplexity at [128] needs held-out documents: give --data FILE"),
    ("eval-no-task", "eval", None, ["--model", "@model"], {}, "nothing to evaluate: give --ppl-lengths with --data"),
    # the model's architecture, before any process group (hf/architecture.py)
    ("cfg-hidden-heads", "train", {"model__config__hidden_size": 102}, [], {},
     "model.config is not a valid llama config: Class validation error for validator 'validate_architecture': "
     "ValueError: The hidden size (102) is not a multiple of the number of attention heads (4)."),
    ("cfg-odd-head-dim", "train", {"model__config__hidden_size": 36}, [], {},
     "model.config is not a valid llama config: Class validation error for validator 'validate_rope': ValueError: "
     "RoPE requires an even rotary dimension, but got `head_dim`=9"),
    ("cfg-kv-0", "train", {"model__config__num_key_value_heads": 0}, [], {},
     "model.config.num_key_value_heads 0 must be a positive divisor of the 4 query heads"),
    ("cfg-kv-3", "train", {"model__config__num_key_value_heads": 3}, [], {},
     "model.config.num_key_value_heads 3 must be a positive divisor of the 4 query heads"),
    ("cfg-rope-keys", "train", {"model__config__rope_scaling": {"rope_type": "yarn"}}, [], {},
     "Missing required keys in `rope_parameters` for 'rope_type'='yarn': {'factor'}"),
    ("cfg-rope-shrink", "train", {"model__config__rope_scaling": {"rope_type": "yarn", "factor": 0.5}}, [], {},
     "model.config.rope_parameters.factor 0.5 is below 1, which would shrink the context"),
    ("cfg-window-0", "train", {"model__config__model_type": "mistral", "model__config__sliding_window": 0}, [], {},
     "model.config.sliding_window must be null (no window) or a positive integer (0 would be no window to the ring"),
    ("cfg-head-dim-0", "train", {"model__config__head_dim": 0}, [], {},
     "model.config.head_dim must be null (hidden_size / heads) or a positive integer, got 0"),
    ("cfg-act", "train", {"model__config__hidden_act": "silly"}, [], {},
     "model.config.hidden_act must be one of transformers' activations (transformers.activations.ACT2FN), got 'silly'"),
    ("cfg-theta-str", "train", {"model__config__rope_theta": "1e4"}, [], {},
     "model.config.rope_theta must be float, got str '1e4'"),
    ("cfg-positions-0", "train", {"model__config__max_position_embeddings": 0}, [], {},
     "model.config.max_position_embeddings must be a positive integer (the trained length the RoPE rules extend), got 0"),
    ("cfg-rope-misspelt", "train", {"model__config__rope_scaling": {"rope_type": "yarn", "factor": 2.0, "beta_fastt": 32}}, [], {},
     "model.config.rope_parameters of rope_type 'yarn' has unknown keys ['beta_fastt']; transformers reads"),
    ("stage-rope-misspelt", "train", {"stages__1__rope_theta": None, "stages__1__rope_scaling": {"rope_type": "yarn", "factor": 2.0, "beta_fastt": 32}}, [], {},
     "stages[1].rope_scaling of rope_type 'yarn' has unknown keys ['beta_fastt']"),
    ("stage-rope-theta", "train", {"stages__1__rope_theta": None, "stages__1__rope_scaling": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 5e5}}, [], {},
     "stages[1].rope_scaling sets rope_theta 500000.0: a stage changes the RoPE base with its own rope_theta"),
    ("cfg-bert", "train", {"model__config": {"model_type": "bert", "vocab_size": 258}}, [], {},
     "model type 'bert': ring attention cannot honour bidirectional (encoder) attention"),
    ("cfg-dropout", "train", {"model__config__attention_dropout": 0.1}, [], {},
     "ring attention cannot honour attention dropout (attention_dropout=0.1)"),
    ("cfg-unknown-type", "train", {"model__config": {"model_type": "nonsense"}}, [], {},
     "model.config is not a valid nonsense config: transformers"),
    ("stage-yarn-shrink", "train", {"stages__1": {"seq_len": 128, "steps": 1, "rope_scaling": {"rope_type": "yarn", "factor": 0.5}}}, [], {},
     "stages[1].rope_scaling.factor 0.5 is below 1"),
    ("tokenizer-empty", "train", {"model__tokenizer": ""}, [], {}, "model.tokenizer must be a non-empty path, got ''"),
    # paths
    ("run-dir-empty", "train", {"run_dir": ""}, [], {}, "run_dir must be a non-empty path, got ''"),
    ("run-dir-flag-empty", "train", {}, ["--run-dir", ""], {}, "run_dir must be a non-empty path, got ''"),
    ("source-empty", "train", {"data__source": ""}, [], {}, "data.source must be a non-empty path, got ''"),
    ("run-dir-file", "train", {"run_dir": "@short"}, [], {}, "is a file; give a folder (it is created if missing)"),
    ("cache-dir-file", "train", {"data__cache_dir": "@short"}, [], {}, "data.cache_dir"),
    ("recipe-folder", "train", "@nofiles", [], {}, "is a folder; give a recipe YAML file"),
    # data, record by record
    ("data-late-missing", "train", {"data__source": "@latemissing"}, [], {},
     "late.jsonl, line 3: the record has no field 'text' (it has ['body']); fix the file or set data.text_field"),
    ("data-null", "train", {"data__source": "@null"}, [], {}, "null.jsonl, line 2: field 'text' holds null, not text"),
    ("data-number", "train", {"data__source": "@number"}, [], {}, "number.jsonl, line 2: field 'text' holds int '7', not text"),
    ("data-blank", "train", {"data__source": "@blank"}, [], {}, "of its 12 records are empty or whitespace only"),
    ("data-latin1", "train", {"data__source": "@latin1"}, [], {}, "latin1.jsonl, line 1: not UTF-8"),
    ("max-sequences-batch", "train", {"data__max_sequences": 1, "micro_batch": 4}, [], {},
     "data.max_sequences 1 is fewer than one step of stages[0] takes (micro_batch 4 x grad_accum 1 x dp 1 = 4"),
    ("split-local", "train", {"data__split": "validation"}, [], {},
     "data.split 'validation': the local source"),
    ("eval-field", "train", {"data__eval_text_field": "body"}, [], {}, "set data.eval_text_field"),
    # values
    ("seed-huge", "train", {"seed": 2**70}, [], {}, "seed must be an integer in [0, 4294967295], got 1180591620717411303424"),
    ("timeout-tiny", "train", {"timeout_minutes": 1e-6}, [], {}, "timeout_minutes must be a finite number in [0.1, 10080.0], got 1e-06"),
    ("lr-string", "train", {"optim__lr": "3e-3"}, [], {}, "optim.lr must be a number, got the string '3e-3'"),
]  # fmt: skip


# name -> (path under the test's folder, content); a path with "/" is a file inside a folder
FILES = {
    "@empty": ("empty.jsonl", ""),
    "@short": ("short.jsonl", '{"text": "too short"}\n'),
    "@badjson": ("bad.jsonl", '{"text": "ok"}\n{"text": unquoted\n'),
    "@nofiles": ("nofiles/notes.md", "x"),
    "@mixed": ("mixed/a.jsonl", '{"text": "a"}\n'),
    "@list": ("list.yaml", "- model\n- stages\n"),
    "@dsbad": ("dsbad.json", "{zero: 1}"),
    "@dsdup": ("dsdup.json", '{"zero_optimization": {}, "zero_optimization": {}}'),
    "@dsretype": ("dsretype.json", '{"gradient_accumulation_steps": 8}'),
    "@latemissing": ("late.jsonl", '{"text": "one"}\n{"text": "two"}\n{"body": "three"}\n'),
    "@null": ("null.jsonl", '{"text": "one"}\n{"text": null}\n'),
    "@number": ("number.jsonl", '{"text": "one"}\n{"text": 7}\n'),
    "@blank": ("blank.jsonl", '{"text": "' + "word " * 200 + '"}\n' + '{"text": "  "}\n' * 11),
}


def _files(tmp, data) -> dict[str, str]:
    """The files a case may name with "@..."."""
    good = recipe(tmp, data).read_text()
    config = yaml.safe_load(good)["model"]["config"]
    table = dict(FILES, **{
        "@dupkey": ("dup.yaml", good + "micro_batch: 4\n"),
        "@badyaml": ("bad.yaml", good + "extra: [1, 2\n"),
        "@model": ("model/config.json", json.dumps(dict(config, num_attention_heads=8))),
    })  # fmt: skip
    (tmp / "mixed").mkdir()
    (tmp / "mixed" / "b.txt").write_text("b")  # beside a.jsonl: two file kinds in one source
    f = {}
    for name, (rel, content) in table.items():
        path = tmp / rel
        path.parent.mkdir(exist_ok=True)
        path.write_text(content)
        f[name] = str(path.parent if "/" in rel else path)
    latin1 = tmp / "latin1.jsonl"
    latin1.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    f["@latin1"] = str(latin1)
    from tests.helpers.models import CONFIGS

    transformers.LlamaForCausalLM(CONFIGS["llama"]()).save_pretrained(tmp / "cutmodel")  # cut short, as a full disk
    weights = tmp / "cutmodel" / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: 8 + int.from_bytes(whole[:8], "little") + 64])  # the header and 64 bytes of data
    f["@cutmodel"] = str(tmp / "cutmodel")
    (tmp / "badconfig").mkdir()
    (tmp / "badconfig" / "config.json").write_text('{"model_type": "llama",')  # hand-edited, cut
    f["@badconfig"] = str(tmp / "badconfig")
    os.mkfifo(tmp / "fifo")  # a named pipe where a file or folder should be
    f["@fifo"] = str(tmp / "fifo")
    os.symlink(tmp / "loop-b", tmp / "loop-a")
    os.symlink(tmp / "loop-a", tmp / "loop-b")
    f["@loop"] = str(tmp / "loop-a")
    f["@trainfile"] = str(data / "train.jsonl")  # the recipe's own training file, as held-out data
    (tmp / "copy").mkdir()
    f["@traincopy"] = str(tmp / "copy" / "held_out.jsonl")  # a copy of it under another name
    (tmp / "copy" / "held_out.jsonl").write_bytes((data / "train.jsonl").read_bytes())
    return f


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_any_model(case, tmp_path, data, monkeypatch, capsys, no_model_loads):
    name, entry, changes, argv, env, fragment = case
    files = _files(tmp_path, data)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE", "RINGPATCH_OVERSUBSCRIBE", "TORCHELASTIC_RESTART_COUNT",
                "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)
    env = dict(env)
    if "WORLD_SIZE" in env and not env.pop("no launcher", False):  # as a launcher sets them
        env = {"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", **env}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if isinstance(changes, dict):
        changes = {k: files.get(v, v) if isinstance(v, str) else v for k, v in changes.items()}
        drop_data = changes.pop("drop_data", False)
        path = str(recipe(tmp_path, data, **changes))
        if drop_data:  # the helper cannot drop a section: rewrite without it
            raw = yaml.safe_load(open(path))
            raw.pop("data")
            open(path, "w").write(yaml.safe_dump(raw))
    else:
        path = None if changes is None else files.get(changes, changes)
    argv = [files.get(a, a) for a in argv]
    if fragment == "@locked":  # a live owner (this test's process) holds the run_dir
        run_dir = yaml.safe_load(open(path))["run_dir"]
        os.makedirs(run_dir)
        with open(os.path.join(run_dir, LOCK_FILE), "w") as f:
            json.dump({"host": os.uname().nodename, "pid": os.getpid(), "started": "now"}, f)
        fragment = f"is in use by another run (pid {os.getpid()} on {os.uname().nodename}"
    args = (["--recipe", path] if path else []) + argv
    if entry == "train":
        code = train_main(args)
    elif entry == "eval":
        code = eval_main(args)
    else:
        code = cli.main([entry, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"ringpatch {entry}: " in err and fragment in err, err
    assert "Traceback" not in err


def test_the_table_covers_at_least_70_cases():
    assert len(CASES) >= 70 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("user", [None, "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_the_commands_ask_cuda_for_expandable_segments_unless_the_user_chose(monkeypatch, tmp_path, user):
    """Set before anything touches CUDA (the first thing main does, even for a bad recipe); a
    user's own allocator setting is kept."""
    import os

    from ringpatch.evaluate.command import main as evaluate
    from ringpatch.train.command import main as train

    for command in (train, evaluate):
        for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
            monkeypatch.delenv(name, raising=False)
        if user:
            monkeypatch.setenv(user, "max_split_size_mb:128")
        assert command(["--recipe", str(tmp_path / "missing.yaml")]) == 2
        if user:
            assert os.environ[user] == "max_split_size_mb:128"
            assert user == "PYTORCH_CUDA_ALLOC_CONF" or "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
        else:
            assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_the_host_is_checked_before_any_model(tmp_path, data, monkeypatch, capsys, no_model_loads):
    """HOME a file (the Hugging Face cache cannot be created), and a torch extension's build lock
    left by a killed run (torch would wait on it forever): each one line before anything starts."""
    path = str(recipe(tmp_path, data))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    home = tmp_path / "home-file"
    home.write_text("not a folder")
    monkeypatch.setenv("HOME", str(home))
    assert train_main(["--recipe", path]) == 2
    err = capsys.readouterr().err
    assert f"the Hugging Face cache (HF_HOME) {home}/.cache/huggingface: {home} is a file" in err, err
    assert "set HF_HOME to a writable folder" in err and "Traceback" not in err
    monkeypatch.setenv("HOME", str(tmp_path))
    lock = tmp_path / "ext" / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert train_main(["--recipe", path]) == 2
    err = capsys.readouterr().err
    assert (
        f"ringpatch train: {lock} was left by a build of a torch extension that was killed (it is 60 minutes old" in err
    )
    assert "if no other run is building it now, remove it" in err


def test_a_build_lock_without_its_builder_is_named_in_seconds(tmp_path, monkeypatch):
    """A torch extension's build lock 60 s old is stale when no process builds in its folder, and
    kept while one does (ninja runs there); a file where TORCH_EXTENSIONS_DIR should be is refused."""
    import subprocess

    from ringpatch.plan.preflight import check_host, stale_extension_locks

    lock = tmp_path / "ext" / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    os.utime(lock, (time.time() - 60, time.time() - 60))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert stale_extension_locks() == [lock]
    builder = subprocess.Popen(["sleep", "60"], cwd=lock.parent)
    try:
        assert stale_extension_locks() == []
    finally:
        builder.kill()
        builder.wait()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(lock))  # a file: nothing can be built under it
    with pytest.raises(ValueError, match="the torch extensions folder \\(TORCH_EXTENSIONS_DIR\\)"):
        check_host(cuda=False)


def test_wandb_online_without_a_key_is_refused_before_start(tmp_path, data, monkeypatch, capsys, no_model_loads):
    for key in ("WANDB_API_KEY", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert train_main(["--recipe", str(recipe(tmp_path, data, wandb="online"))]) == 2
    err = capsys.readouterr().err
    assert "wandb: online in" in err and "no wandb key is set (WANDB_API_KEY, or `wandb login`" in err, err
