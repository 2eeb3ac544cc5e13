# Two commands on a fresh machine: `make repro` and `make test`.
# Both create .venv and install the exact pins of requirements.lock first.
SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup repro test test-fast lint bench ui clean

setup: $(STAMP)

$(STAMP):
	@command -v python3 >/dev/null || { echo "error: python3 (3.11+) is required"; exit 1; }
	@command -v npm >/dev/null || echo "warning: npm not found; the download stage needs it (or data.source_dir)"
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# Exact pins; torch 2.14.1 + torchvision 0.29.1 never float to a newer release.
	$(PYTHON) -m pip install --quiet -c requirements.lock -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

repro: setup
	dvc repro

test: setup
	ruff check src tests
	ruff format --check src tests
	pytest -q

test-fast: setup
	pytest -q -m "not slow and not network"

lint: setup
	ruff check src tests && ruff format --check src tests

# Throughput of the report's loop vs the train stage's loop (needs the data: preprocess stage).
bench: setup
	dvc repro preprocess
	python -m mnist_cnn.bench $(BENCH_ARGS)

# The MLflow UI over this checkout's store, on loopback only.
ui: setup
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
