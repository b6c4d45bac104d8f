# mathforge: `make run` runs the pipeline on the embedded default; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export TOKENIZERS_PARALLELISM := false
PRESET ?= tiny

.PHONY: run test lint install install-dev ui clean

# torch is installed first from its pinned CPU build: any other torch spec pulls GBs of CUDA wheels.
$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# uv installs the rest in parallel (pip takes minutes for ~180 packages on 2 cores); it keeps the torch above.
# --compile-bytecode: uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE is set (CI) every
# process would compile prefect/mlflow/transformers from source at each start (import prefect: 11 s CPU, not 2.5)
$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q torch==2.13.0 uv
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q torch==2.13.0 uv
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e ".[dev]"
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/mathforge pipeline --preset $(PRESET)

# two workers: most integration time is servers starting up, which overlaps well on 2 cores
TEST_WORKERS ?= 2
test: install-dev
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: install-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# MLflow UI over the local store (http://127.0.0.1:5000)
ui: install
	$(BIN)/mathforge ui

clean:
	rm -rf .mathforge
