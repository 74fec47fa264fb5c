# Quick start: `make run` (worker against local services) and `make test`.
# Both create their own virtual environment in .venv on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test lint fuzz cluster-test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

## Migrate the database (creating it if missing), then run the worker until Ctrl-C.
run: install
	$(BIN)/plugin-state-worker migrate
	$(BIN)/plugin-state-worker run

## Lint, type-check, check the import contracts, then the whole test suite against the real RabbitMQ and Postgres.
test: install lint
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

## A long fuzz run: the coverage-guided fuzzer for PLUGIN_STATE_FUZZ_SECONDS (1 hour), hypothesis
## over hostile bytes and structures, and hostile messages through running workers.
fuzz: install
	export PLUGIN_STATE_FUZZ_SECONDS=$${PLUGIN_STATE_FUZZ_SECONDS:-3600} \
		PLUGIN_STATE_FUZZ_RUNS=$${PLUGIN_STATE_FUZZ_RUNS:--1} \
		PLUGIN_STATE_FUZZ_EXAMPLES=$${PLUGIN_STATE_FUZZ_EXAMPLES:-50000} \
		PLUGIN_STATE_SOAK_SECONDS=$${PLUGIN_STATE_SOAK_SECONDS:-600}; \
	$(BIN)/pytest -p no:cacheprovider -s tests/test_fuzz.py tests/test_hostile_input.py \
		tests/test_hostile_soak.py && \
	$(BIN)/pytest -p no:cacheprovider tests/test_contract.py -k "any_"

## The tests of the test-owned 3-node RabbitMQ cluster (tests/cluster.py), at full size:
## 20,000 writes through the kills and the partition (`make test` sends 200).
cluster-test: install
	PLUGIN_STATE_CLUSTER_MESSAGES=$${PLUGIN_STATE_CLUSTER_MESSAGES:-20000} $(BIN)/pytest -p no:cacheprovider \
		-m cluster -s

## The benchmark of docs/performance.md (full size; see --help for the knobs).
bench: install
	$(BIN)/plugin-state-worker bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
