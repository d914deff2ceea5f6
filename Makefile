# One command to see it work (make run), one to pass the tests (make test).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STACK := $(PY) -m deploy.local.stack

.PHONY: help venv up down status run demo test lint test-unit test-integration test-e2e bench chaos reset clean import import-balances bench-import

help:
	@echo "make run    start everything, play demo traffic with a live summary; Ctrl-C stops it all"
	@echo "make up     start broker, PostgreSQL and every service in the background (idempotent)"
	@echo "make down   stop everything make up started (PostgreSQL's data stays; the broker keeps nothing)"
	@echo "make status what runs"
	@echo "make reset  make down, then remove PostgreSQL's data and .run/ (ports, partitions, local secrets, logs)"
	@echo "make clean  make reset, then remove .venv"
	@echo "make test   the whole test suite against its own broker and PostgreSQL"
	@echo "make bench  end-to-end load benchmark, prints figures (BENCH_SIZE=quick for a short run)"
	@echo "make chaos  fault injection under load, checked against a reference model (CHAOS_SIZE=quick for a short run)"
	@echo "make import FILE=history.jsonl|.csv [POLICY=analytics|as-earned]  import purchase history (resumable)"
	@echo "make import-balances FILE=balances.csv [REASON=...]  opening balances with a history import"

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

venv: $(VENV)/.installed

up: venv
	$(STACK) up

down:
	@if [ -x $(PY) ]; then $(STACK) down; else echo "nothing to stop"; fi

status: venv
	$(STACK) status

run: venv
	$(STACK) run

test: venv lint
	$(PY) -m deploy.local.ensure_postgres
	$(PY) -m deploy.local.ensure_promtool
	$(PY) -m deploy.local.ensure_chromium
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Four workers on two cores (most of a test is waiting: group joins, relays, process
# start-ups), each with its own broker and PostgreSQL (tests/conftest.py); a test file stays
# on one worker, so module-scoped services start once, except the process-level tests, one a
# unit and handed out first (tests/conftest.py, pytest_xdist_make_scheduler). PYTEST_ARGS=
# runs in one process.
PYTEST_ARGS ?= -n 4 --dist loadfile

# ruff check: lint rules in pyproject.toml ([tool.ruff]). The formatter is configured but not
# enforced yet (it would rewrap most modules; see README "Tests").
lint: venv
	$(VENV)/bin/ruff check .

test-unit: venv
	$(PY) -m pytest -q tests/unit

test-integration: venv
	$(PY) -m pytest -q tests/integration

test-e2e: venv
	$(PY) -m pytest -q tests/e2e

# BENCH_SIZE=quick for a run that fits in CI; full (default) sustains a minute and more.
BENCH_SIZE ?= full
bench: venv
	$(PY) -m deploy.local.ensure_postgres
	$(PY) -m bench.e2e --size $(BENCH_SIZE)

reset:
	@if [ -x $(PY) ]; then $(STACK) reset; else rm -rf .run; fi

clean: reset
	rm -rf $(VENV)

# CHAOS_SIZE=quick for a short run (tests/e2e/test_chaos.py runs it in make test); full streams 100,000 purchases.
CHAOS_SIZE ?= full
chaos: venv
	$(PY) -m deploy.local.ensure_postgres
	$(PY) -m bench.chaos --size $(CHAOS_SIZE)

# History import (services/purchases/importer.py): POLICY=analytics (default: history earns
# nothing) or as-earned. Resumes from FILE.checkpoint.json when an earlier run was cut short;
# running it again changes nothing. Reads the stack's endpoints from .run/endpoints.env (make up).
POLICY ?= analytics
ENDPOINTS_ENV := .run/endpoints.env
import: venv
	@test -n "$(FILE)" || { echo "usage: make import FILE=history.jsonl [POLICY=analytics|as-earned]"; exit 2; }
	@set -a; [ -f $(ENDPOINTS_ENV) ] && . ./$(ENDPOINTS_ENV); set +a; \
	PURCHASES_KAFKA_BOOTSTRAP_SERVERS=$${PURCHASES_KAFKA_BOOTSTRAP_SERVERS:-$${KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:9092}} \
	$(PY) -m services.purchases.importer "$(FILE)" --policy $(POLICY) --resume

import-balances: venv
	@test -n "$(FILE)" || { echo "usage: make import-balances FILE=balances.csv [REASON='why']"; exit 2; }
	@set -a; [ -f $(ENDPOINTS_ENV) ] && . ./$(ENDPOINTS_ENV); set +a; \
	$(PY) -m services.ledger.opening_balances "$(FILE)" $(if $(REASON),--reason "$(REASON)")

# IMPORT_SIZE purchases per policy (default 100,000).
IMPORT_SIZE ?= 100000
bench-import: venv
	$(PY) -m deploy.local.ensure_postgres
	$(PY) -m bench.history_import --purchases $(IMPORT_SIZE)
