# Two commands on a fresh machine: `make up` runs the whole stack, `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up test lint bench clean protos system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

up: $(STAMP)
	$(BIN)/switchyard up --config switchyard.yaml

test: $(STAMP) system-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The Python code of protos/ (Envoy's metrics service), committed under controlplane/_gen;
# tests/test_envoy_stats.py fails when it is stale.
protos: $(STAMP)
	$(BIN)/python protos/generate.py controlplane/_gen

# Debian packages the tests run for real (Prometheus, Chromium, kubectl); only what is missing.
system-deps:
	@scripts/install-system-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .switchyard
