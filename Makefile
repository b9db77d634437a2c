# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo run test lint typecheck unit bench system-deps install clean

## demo: set up, then archive the reference quiz through the whole stack
demo: install system-deps
	$(BIN)/archive-worker demo

## run: set up, then start bridge + worker (+ embedded NATS) for a real Moodle
run: install system-deps
	$(BIN)/archive-worker up

## test: set up, then lint, type-check and run the whole test suite
test: install system-deps lint typecheck unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

unit: install system-deps
	$(BIN)/pytest

## bench: the benchmarks (not part of the tests)
bench: install system-deps
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

system-deps:
	./scripts/install-system-deps

clean:
	rm -rf $(VENV) .archive-worker .mypy_cache .ruff_cache .pytest_cache
