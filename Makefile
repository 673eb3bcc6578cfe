# Two commands on a fresh machine: `make up` runs the whole stack, `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The picker's native engine (setup.py), rebuilt in place whenever its C source changes.
NATIVE := $(VENV)/.native

.PHONY: up observe test test-vllm lint bench clean protos system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml requirements/serve.txt requirements/envoy.txt
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(NATIVE): $(STAMP) controlplane/picker/_native.c setup.py
	$(BIN)/python setup.py --quiet build_ext --inplace
	touch $(NATIVE)

up: $(STAMP) $(NATIVE)
	$(BIN)/switchyard up --config switchyard.yaml

# `make up` with Prometheus beside it (http://127.0.0.1:9090, prometheus.yml: everything scraped
# each second, data in .switchyard/prometheus). Ctrl-C stops both. docs/observability.md.
observe: $(STAMP) $(NATIVE)
	@command -v prometheus >/dev/null || { echo "observe: prometheus is not installed;" \
	    "run 'make system-deps' (Debian package prometheus)" >&2; exit 1; }
	@mkdir -p .switchyard/prometheus
	@prometheus --config.file=prometheus.yml --storage.tsdb.path=.switchyard/prometheus \
	    --storage.tsdb.retention.time=2d --web.listen-address=127.0.0.1:9090 \
	    --log.level=warn & prom=$$!; \
	trap 'kill $$prom 2>/dev/null; wait $$prom' EXIT; trap 'exit 130' INT TERM; \
	echo "Prometheus: http://127.0.0.1:9090 (pid $$prom)"; \
	$(BIN)/switchyard up --config switchyard.yaml

# Two pytest workers, each taking whole files (module-scoped stacks start once); most tests
# wait on real processes, so two share the 2 cores well. tests/test_openapi.py runs on its own:
# schemathesis gives its cases one node id, which xdist would run only once.
test: $(STAMP) system-deps $(NATIVE)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests/test_openapi.py
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --ignore tests/test_openapi.py

# The scenarios of tests/scenarios/ again, against real vLLM servers instead of the simulator:
# vLLM's CPU build in its own .venv-vllm (scripts/vllm-env.sh, about 2 min the first time) and
# a tiny random model generated on first use (.vllm-test/). docs/runtimes.md says what it covers.
test-vllm: $(STAMP) $(NATIVE)
	scripts/vllm-env.sh
	SWITCHYARD_TEST_BACKEND=vllm $(BIN)/python -m pytest -q tests/scenarios

# The Python code of protos/ (Envoy's metrics service), committed under controlplane/_gen;
# tests/test_envoy_stats.py fails when it is stale.
protos: $(STAMP)
	$(BIN)/python protos/generate.py controlplane/_gen

# Debian packages the tests run for real (Prometheus, Chromium); only what is missing. Under
# CI=true one it cannot install fails the run. (kubectl comes pinned with the test extra.)
system-deps:
	@scripts/install-system-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check .

# The benchmark suite, short runs (~7 min; docs/benchmarks.md). The documented runs:
# `make bench BENCH_ARGS=--full`; one benchmark: `make bench BENCH_ARGS="--only fanout"`.
bench: $(STAMP) $(NATIVE)
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .switchyard build
	rm -f controlplane/picker/_native*.so
