# Every target installs what it needs through `setup`; see README.md.
SHELL := /bin/bash
VENV := .venv/bin
PYTEST_ARGS ?=
# `make test` and `make flake`: run integration beside e2e (each layer has its own servers);
# empty (the default): one layer after another
SUITE_PARALLEL ?=
# `make test` and `make flake`: layers cut into pytest processes side by side, each with its own
# servers, balanced by tests/durations.json, e.g. integration=2,e2e=3; empty (the default): one
# process a layer
SUITE_SHARDS ?=
FLAKE_ROUNDS ?= 3
# `make bench`'s Pod rescue benchmark, e.g. "--kills 100 --freezes 5" (benchmarks/pod_rescue.py)
POD_RESCUE_BENCH_ARGS ?=
# `make bench`'s rescue-ahead benchmark, e.g. "--repeats 5" (benchmarks/rescue_ahead.py)
RESCUE_AHEAD_BENCH_ARGS ?=
# test files or ids (under tests/integration/ or tests/e2e/) for `make flake`; empty: both layers whole
FLAKE_ARGS ?=
FLAKE_STRESS ?= --cpu 1
# `make check`: the fastest integration tests, a smoke test of the real servers
CHECK_TESTS ?= tests/integration/test_stack_smoke.py
SUITE := python3 scripts/run_suite.py
SUITE_FLAGS = $(if $(SUITE_PARALLEL),--parallel) --shards '$(SUITE_SHARDS)' --pytest-args '$(PYTEST_ARGS)'

.PHONY: help setup test check flake unit compat lint lint-only demo chaos bench lock manifests docs stack-up stack-down clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: ## install Debian packages, .venv and the control-plane binaries (idempotent)
	@bash scripts/setup.sh

test: ## set-up, lint, then every layer against real servers; prints durations and the per-layer wall times
	$(SUITE) test $(SUITE_FLAGS)

check: ## before each commit: lint, unit and the fastest integration tests (no set-up)
	$(SUITE) test --no-setup --no-timings --layers unit,integration --tests 'tests/unit $(CHECK_TESTS)' $(SUITE_FLAGS)

flake: setup ## integration and e2e FLAKE_ROUNDS times under CPU load; lists every test that ever failed
	$(SUITE) flake --rounds $(FLAKE_ROUNDS) --stress '$(FLAKE_STRESS)' --tests '$(FLAKE_ARGS)' $(SUITE_FLAGS)

unit: setup ## run the pure unit tests only
	$(VENV)/pytest tests/unit $(PYTEST_ARGS)

compat: setup ## the worker wheel's tests across the Python, Celery, Django and psycopg it declares
	$(VENV)/python scripts/compat.py $(COMPAT_ARGS)

lint: setup ## ruff, mypy and hadolint
	@$(MAKE) --no-print-directory lint-only

lint-only:
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/mypy
	$(VENV)/hadolint Dockerfile
	@echo "lint: clean"

demo: setup ## the main job end to end on a local stack
	$(VENV)/python -m devstack demo $(DEMO_ARGS)

chaos: setup ## 10,000 entries under 25 faults of every kind; invariants and rescue latency
	$(VENV)/python -m devstack chaos $(CHAOS_ARGS)

bench: setup ## dispatch, worker-side cost, history at scale, rescue latency (worker Pods killed and frozen on the node) against same-run baselines; a migration at 1M attempts
	$(VENV)/python -m benchmarks $(BENCH_ARGS)
	$(VENV)/python -m benchmarks.rescue --compare-tail $(RESCUE_BENCH_ARGS)
	$(VENV)/python -m benchmarks.rescue_ahead $(RESCUE_AHEAD_BENCH_ARGS)
	$(VENV)/python -m benchmarks.pod_rescue $(POD_RESCUE_BENCH_ARGS)
	ONLINE_MIGRATION_HISTORY=1000000 $(VENV)/pytest -q -s -p no:cacheprovider \
		'tests/integration/test_online_migration.py::test_a_migration_over_a_large_history_kills_no_body_and_loses_no_attempt'

lock: setup ## re-resolve requirements/*.txt (with hashes) from the pyproject files and prove them
	bash scripts/lock.sh

manifests: setup ## render manifests/crds.yaml and install.yaml from the Helm chart
	bash scripts/render-manifests.sh

docs: setup ## render docs/api-reference.md from the CRD schemas
	$(VENV)/python scripts/api-reference.py

stack-up: setup ## start etcd, kube-apiserver, a node, PostgreSQL, Redis and RabbitMQ for a person
	$(VENV)/python -m devstack up

stack-down: ## stop what stack-up started
	$(VENV)/python -m devstack down

clean: ## remove the venv and local state (keeps the control-plane cache)
	rm -rf .venv .stack .pytest_cache .mypy_cache .ruff_cache
