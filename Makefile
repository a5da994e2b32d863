# `make pretrain` and `make test` set themselves up on a fresh machine.
PYTHON ?= python3
# The CPU wheel that lies on local disk here; only installed when no torch is importable.
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup setup-optuna setup-joblib pretrain test test-fast lint format bench gpu-wheels gpu-check clean

setup: $(STAMP)

# --system-site-packages: a torch the user already has stays in use.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Optional extras on their own (`make setup` installs them all, for the tests).
setup-optuna: setup
	$(PY) -m pip install -q -e ".[optuna]"

setup-joblib: setup
	$(PY) -m pip install -q -e ".[joblib]"

pretrain: setup
	$(VENV)/bin/lmtrain pretrain $(ARGS)

# Test processes (pytest-xdist): one per core, at most 4; each runs torch on one thread (tests/conftest.py).
XDIST := -n auto --maxprocesses=4

test: setup
	$(PY) -m pytest $(XDIST) $(ARGS)

# The edit loop: everything but the tests that start processes (marked slow in tests/conftest.py).
test-fast: setup
	$(PY) -m pytest $(XDIST) -m "not slow" $(ARGS)

lint: setup
	$(VENV)/bin/ruff check lmtrain tests scripts
	$(VENV)/bin/ruff format --check lmtrain tests scripts
	$(VENV)/bin/mypy lmtrain

format: setup
	$(VENV)/bin/ruff check --fix lmtrain tests scripts
	$(VENV)/bin/ruff format lmtrain tests scripts

bench: setup
	$(PY) scripts/bench_throughput.py $(ARGS)

# scripts/gpu_check.sh on a machine without a package index: the Hydra wheels it lacks, fetched here first
gpu-wheels: setup
	$(PY) -m pip wheel -q --no-deps -w .wheels "hydra-core>=1.3,<1.4" "omegaconf>=2.3" "antlr4-python3-runtime==4.9.*"

gpu-check:
	bash scripts/gpu_check.sh $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
