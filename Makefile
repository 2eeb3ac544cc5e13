# Two commands on a fresh machine: `make repro` and `make test`.
# Both create .venv and install the exact pins of requirements.lock first.
SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup lock team-deps ui-deps repro pull push test test-fast lint bench ablation ui serve loadtest clean

setup: $(STAMP)

$(STAMP):
	@command -v python3 >/dev/null || { echo "error: python3 (3.11+) is required"; exit 1; }
	@command -v npm >/dev/null || echo "warning: npm not found; the download stage needs it (or data.source_dir)"
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# Exact pins; torch 2.14.1 + torchvision 0.29.1 never float to a newer release.
	$(PYTHON) -m pip install --quiet -c requirements.lock -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

# requirements.lock from pyproject.toml: pip resolves (dry run, nothing installed), constrained by the
# current pins; UPGRADE=name,... lets those float to the newest allowed (docs/development.md).
lock: setup
	python dev/lock.py

# A team on object storage (docs/operations.md): the `team` extra (dvc-s3, boto3) and `team-test` (moto's
# S3 server, for the tests that use it), from the same pins; `make setup` and `make repro` leave them out.
TEAM_STAMP := $(subst .installed-,.team-installed-,$(STAMP))

team-deps: $(TEAM_STAMP)

$(TEAM_STAMP): $(STAMP)
	$(PYTHON) -m pip install --quiet -c requirements.lock -e ".[dev,team,team-test]"
	rm -f $(VENV)/.team-installed-* && touch $@

# tests/e2e/test_ui.py drives /usr/bin/chromium (apt; .ci/run installs it) with playwright-core from npm,
# pinned exactly in tests/ui/package.json; no lockfile is written (it would record the registry host).
UI_STAMP := tests/ui/node_modules/.installed-$(shell cksum < tests/ui/package.json | cut -d' ' -f1)

ui-deps: $(UI_STAMP)

$(UI_STAMP): tests/ui/package.json
	@if command -v npm >/dev/null; then \
		npm install --no-package-lock --no-audit --no-fund --prefix tests/ui \
		&& rm -f tests/ui/node_modules/.installed-* && touch $@; \
	else echo "warning: npm not found; tests/e2e/test_ui.py will be skipped"; fi

repro: setup
	dvc repro

# Restore data, processed tensors and the model from the DVC remote instead of rebuilding them
# (docs/operations.md, "Sharing"); the remote is checked first, so an unreachable one is named in one line.
pull: setup
	python -m mnist_cnn.tools.remote
	dvc pull

push: setup
	python -m mnist_cnn.tools.remote
	dvc push

# pytest-xdist workers (0: all in this process). The tests that share a session fixture run in one
# worker, the longest groups first (tests/conftest.py). The full suite's end-to-end tests wait on
# servers and subprocesses much of the time, so 4 workers keep 2 cores busier than 2 do; the fast
# suite is all CPU, where 2 is quicker.
TEST_WORKERS ?= 4
FAST_WORKERS ?= 2
PYTEST := pytest -q --dist loadgroup --no-loadscope-reorder

test: setup ui-deps
	ruff check src tests dev
	ruff format --check src tests dev
	python dev/check_refs.py
	$(PYTEST) -n $(TEST_WORKERS)

test-fast: setup
	$(PYTEST) -n $(FAST_WORKERS) -m "not slow and not network"

# ruff, and every path, module and make target that README.md, docs/, Makefile, .ci/run and tests/ui/ name
lint: setup
	ruff check src tests dev && ruff format --check src tests dev
	python dev/check_refs.py

# Throughput of the report's loop vs the train stage's loop (needs the data: preprocess stage).
bench: setup
	dvc repro preprocess
	python -m mnist_cnn.tools.bench $(BENCH_ARGS)

# The report's ablation with error bars: augment on/off x 5 seeds through DVC's queue as one MLflow
# parent run (JOBS workers; each experiment's runs are its children), then the summary of that
# parent's children in ablation/. KNOB=KEY=A,B measures another param, A against B, into a folder
# of its own (ablation/<key>/), e.g. make ablation KNOB=model.input_norm=background,none; ABLATION_ARGS
# holds fixed -S options, e.g. "-S train.precision=auto" (JOBS > 1 pays only with spare cores or GPUs)
JOBS ?= 1
KNOB ?= augment=true,false
SEEDS ?= 0,1,2,3,4
ABLATION_ARGS ?=
ablation: setup
	dvc repro preprocess
	python -m mnist_cnn.tools.sweep --knob $(KNOB) --seeds $(SEEDS) -j $(JOBS) $(ABLATION_ARGS)
	python -m mnist_cnn.tools.ablation --knob $(KNOB)

# The MLflow UI over this checkout's store, on loopback only; it prints the experiment's URL in the
# training view (MLflow 3 otherwise opens on its GenAI view).
ui: setup
	@env -u MLFLOW_TRACKING_URI python -c "from mnist_cnn.tracking import store; print('open', store.ui_url('http://127.0.0.1:5000'))"
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --host 127.0.0.1 --port 5000

# The registry's champion behind MLflow's REST scoring server (/invocations), loopback only, with the
# project's guard in front (body cap, schema check, short errors, adaptive batching: docs/serving.md).
# The champion is resolved once, at start (the version is printed): restart to serve a new one.
# SERVE_WORKERS uvicorn processes (one per core), each with ONE torch thread: N workers with torch's
# default of one thread per core would oversubscribe the cores. No access-log line per request
# (UVICORN_ACCESS_LOG=true brings it back). uvicorn picks httptools and uvloop (dependencies of
# this package) over h11 and asyncio's loop by itself. docs/serving.md has the measurements.
SERVE_WORKERS ?= 2
SERVE_MODEL ?= models:/mnist-cnn@champion
SERVE_MAX_BODY ?= 1048576
serve: setup
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlruns/mlflow.db} \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} UVICORN_ACCESS_LOG=$${UVICORN_ACCESS_LOG:-false} \
	python -m mnist_cnn.serving.server -m $(SERVE_MODEL) -h 127.0.0.1 -p 5001 \
		--workers $(SERVE_WORKERS) --max-body $(SERVE_MAX_BODY)

# Bounded load on `make serve` from another shell (loopback only), e.g. LOADTEST_ARGS="-c 50 -d 20".
loadtest: setup
	python -m mnist_cnn.tools.loadtest $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache tests/ui/node_modules
