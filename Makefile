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

.PHONY: install demo test lint format bench gpu-check clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
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

demo: install
	$(BIN)/torchrun --standalone --nproc_per_node $(NPROC) -m ringpatch.selfcheck

test: install lint
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check ringpatch tests bench examples data
	$(BIN)/ruff format --check ringpatch tests bench examples data

format: install
	$(BIN)/ruff check --fix ringpatch tests bench examples data
	$(BIN)/ruff format ringpatch tests bench examples data

bench: install
	$(BIN)/python bench/attention.py
	$(BIN)/python bench/model.py

gpu-check: install
	$(BIN)/python bench/gpu_check.py

clean:
	rm -rf $(VENV) runs bench/results *.egg-info
