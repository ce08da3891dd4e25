# The README's two set-up commands are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/polymap: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first: a bare `torch` requirement could pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/polymap

install: $(BIN)/polymap

demo: install
	$(BIN)/polymap demo --out demo-out

test: install
	$(BIN)/python -m pytest -q

test-fast: install  # the edit-test loop: everything but the tests marked slow
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check polymap tests benchmarks examples
	$(BIN)/ruff format --check polymap tests benchmarks examples

bench: install
	$(BIN)/python benchmarks/bench_extract.py

.PHONY: install demo test test-fast lint bench
