# auto-trace — every developer task is a target here. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install lint format test unit integration bench demo chaos helm image-check dashboards clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Ingest's native fast path (native/, Rust). NATIVE=0 skips it: everything works without it,
# only slower, and its tests are skipped (they say so).
NATIVE ?= 1
# The tests fail (not skip) without the native module unless NATIVE=0 said it is left out.
export AUTO_TRACE_REQUIRE_NATIVE := $(NATIVE)
NATIVE_STAMP := $(VENV)/.native
# Compiled crates live with the other downloads, outside the checkout: the wheel build, clippy
# and the image check (tools/check_dockerfile.py) reuse them, and so does the next clone.
export CARGO_TARGET_DIR ?= $(or $(AUTO_TRACE_CACHE_DIR),$(HOME)/.cache/auto-trace)/cargo-target
NATIVE_SRC := native/Cargo.toml native/Cargo.lock native/pyproject.toml $(wildcard native/src/*.rs)

$(NATIVE_STAMP): $(NATIVE_SRC) | $(STAMP)
	@command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) to build the native fast path, or run make with NATIVE=0" >&2; exit 1; }
	$(PY) -m pip install --quiet ./native
	$(PY) -c "import auto_trace_native"
	touch $(NATIVE_STAMP)

ifeq ($(NATIVE),0)
install: $(STAMP) ## create .venv and install auto-trace with its development tools (and the native fast path)
else
install: $(STAMP) $(NATIVE_STAMP)
endif

lint: install ## ruff (lint + format check) and mypy --strict on the package
	$(VENV)/bin/ruff check consumer tests tools bench chaos
	$(VENV)/bin/ruff format --check consumer tests tools bench chaos
	$(VENV)/bin/mypy --strict consumer chaos bench
ifneq ($(NATIVE),0)
	cd native && cargo fmt --check && cargo clippy --quiet --release -- -D warnings
endif

format: install ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix consumer tests tools bench chaos
	$(VENV)/bin/ruff format consumer tests tools bench chaos

test: lint ## lint, then the whole test suite against a real Kafka broker (started if needed)
	$(PY) -c "from consumer.broker import ensure_broker_jars; print(ensure_broker_jars())"
	$(PY) tools/ensure_helm.py
	$(PY) -m pytest $(PYTEST_ARGS)

unit: install ## only the tests that need no broker
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: install ## only the tests against the real broker (and a real Prometheus)
	$(PY) -m pytest tests/integration tests/observability $(PYTEST_ARGS)

bench: install ## side-by-side throughput / lateness / memory ratios (BENCH_SCALE=0.1 to shrink)
	$(PY) -m bench

chaos: install ## the whole pipeline under SIGKILLs, broker restarts and poison input; exits 0 only if clean
	$(PY) -m chaos $(CHAOS_ARGS)

demo: install ## a local broker, the pipeline, a webhook receiver and sample trades, end to end
	$(PY) -m consumer demo

helm: install ## chart: helm lint --strict + every ci/ scenario rendered and schema-validated (builds helm once)
	$(PY) tools/ensure_helm.py
	$(PY) -m pytest tests/helm $(PYTEST_ARGS)

image-check: install ## the Dockerfile without a container engine: static checks, then its install steps
	$(PY) tools/check_dockerfile.py --install

dashboards: install ## redraw docs/dashboards/*.png from a real run (a minute of traffic; installs matplotlib)
	rm -rf .dashboards
	AUTO_TRACE_DASHBOARD_DUMP=.dashboards AUTO_TRACE_DASHBOARD_RUN_S=60 $(PY) -m pytest tests/observability/test_dashboards.py $(PYTEST_ARGS)
	$(PY) -m pip install --quiet 'matplotlib>=3.9,<4'
	$(PY) tools/render_dashboards.py .dashboards docs/dashboards

clean: ## remove the virtualenv and caches (the broker jar cache in ~/.cache/auto-trace stays)
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis .dashboards
