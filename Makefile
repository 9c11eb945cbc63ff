# Local development and CI entry points. `make test` is what CI runs (.ci/run).
#
# Kafka and Jaeger run natively, no Docker needed: the first `make deps` downloads Kafka with
# Maven (about a minute) and builds Jaeger with Go (several minutes); both are cached under
# ~/.cache/saga-engine (or $XDG_CACHE_HOME/saga-engine), so later runs start in seconds.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON3 ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Written after a successful install; pip runs again whenever pyproject.toml is newer.
STAMP := $(VENV)/.installed
# Directories mypy checks; `services` joins as soon as it exists.
TYPED := $(wildcard saga deploy services)

KAFKA_PORT ?= 9092
KAFKA_CONTROLLER_PORT ?= 9093
# `make kafka-up BROKERS=3`: a KRaft cluster instead, node k on KAFKA_PORT + 2(k-1) and
# KAFKA_CONTROLLER_PORT + 2(k-1) (9092/9093, 9094/9095, 9096/9097). `make kafka-down` stops
# either.
BROKERS ?= 1
# `make kafka-up SECURE=1`: the single broker with TLS, SASL/SCRAM and ACLs instead (same ports;
# deploy/kafka_secure.py). It writes ~/.cache/saga-engine/secure/<principal>.env for clients.
SECURE ?=

.PHONY: help .venv install deps test-deps kafka-up kafka-down jaeger-up jaeger-down lint test demo bench bench-perf bench-peers chaos clean

help:
	@echo "make install      create .venv and install the project with its dev extras"
	@echo "make deps         fetch Kafka and build Jaeger into the user cache (once)"
	@echo "make test-deps    deps, plus Docker Compose and Chromium for the tests"
	@echo "make kafka-up     start Kafka on 127.0.0.1:$(KAFKA_PORT) in the background"
	@echo "                  (BROKERS=3: a 3-broker cluster on ports $(KAFKA_PORT), +2, +4)"
	@echo "                  (SECURE=1: SASL_SSL only, SCRAM users, ACLs; env files in"
	@echo "                  ~/.cache/saga-engine/secure/<principal>.env)"
	@echo "make kafka-down   stop it (the single broker, the secured one or the cluster)"
	@echo "make jaeger-up    start Jaeger (OTLP 4317/4318, query API http://127.0.0.1:16686)"
	@echo "make jaeger-down  stop it"
	@echo "make lint         ruff and mypy --strict"
	@echo "make test         install, deps, lint, then pytest (starts its own Kafka and Jaeger)"
	@echo "make demo         run the example services against kafka-up and jaeger-up, with the"
	@echo "                  console on http://127.0.0.1:8080 (CONSOLE_PORT=...)"
	@echo "                  (SECURE=1: on kafka-up SECURE=1, every process signing as its"
	@echo "                  principal, the policy enforced, payloads sealed; keys made once in"
	@echo "                  ~/.cache/saga-engine/secure/demo)"
	@echo "make chaos        the chaos suite at a larger size (CHAOS_SAGAS, CHAOS_SEED to replay)"
	@echo "make bench        benchmarks on a throwaway Kafka and Jaeger (report: bench/REPORT.md)"
	@echo "make bench-peers  the engine beside Temporal, Restate and DBOS (bench/results/peers.md,"
	@echo "                  bench/peers.png)"
	@echo "make bench-perf   only the B1-B7 suite of bench/perf (PERF_ARGS=--quick: a few minutes)"
	@echo "make clean        remove .venv and the project's caches (not ~/.cache)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

.venv install: $(STAMP)

deps: $(STAMP)
	$(PY) -m deploy.kafka fetch
	$(PY) -m deploy.jaeger build

# What only the tests need besides: Docker Compose (to check deploy/docker-compose.yml; built
# from its Go module, minutes on a fresh machine) and Debian's Chromium for the browser tests.
test-deps: deps
	$(PY) -m deploy.compose install
	$(PY) -m deploy.chromium install

kafka-up: $(STAMP)
ifneq ($(SECURE),)
	$(PY) -m deploy.kafka_secure up --port $(KAFKA_PORT) --controller-port $(KAFKA_CONTROLLER_PORT)
else ifeq ($(BROKERS),1)
	$(PY) -m deploy.kafka up --port $(KAFKA_PORT) --controller-port $(KAFKA_CONTROLLER_PORT)
else
	$(PY) -m deploy.kafka_cluster up --brokers $(BROKERS) \
		--port $(KAFKA_PORT) --controller-port $(KAFKA_CONTROLLER_PORT)
endif

kafka-down: $(STAMP)
	$(PY) -m deploy.kafka down
	$(PY) -m deploy.kafka_secure down
	$(PY) -m deploy.kafka_cluster down

jaeger-up: $(STAMP)
	$(PY) -m deploy.jaeger up

jaeger-down: $(STAMP)
	$(PY) -m deploy.jaeger down

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy --strict $(TYPED)

# Sequential on purpose, even under `make -j`: lint failures should stop the run before the
# slow part, and deps must be complete before pytest's fixtures start Kafka and Jaeger.
# Two xdist workers, each with its own lazily started servers (tests/conftest.py keeps the
# cluster's and the secured broker's tests on one worker each).
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(MAKE) --no-print-directory test-deps
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup

# The demo serves the console (saga serve) beside its processes, on CONSOLE_PORT (default
# $SAGA_CONSOLE_PORT, else 8080); if the port is taken it says so and runs without it. `deps`
# only: the demo needs no Docker Compose nor Chromium (those are `test-deps`).
CONSOLE_PORT ?=
demo: $(STAMP)
	$(MAKE) --no-print-directory deps
	$(MAKE) --no-print-directory kafka-up
	$(MAKE) --no-print-directory jaeger-up
	SAGA_KAFKA_BOOTSTRAP=127.0.0.1:$(KAFKA_PORT) \
	OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 \
	$(PY) -m services.demo $(if $(SECURE),--secure) \
		$(if $(CONSOLE_PORT),--console-port $(CONSOLE_PORT))

# The chaos suite runs in `make test` at a small size; this runs it larger. A failing run prints
# its seed: CHAOS_SEED=<seed> make chaos replays it.
CHAOS_SAGAS ?= 150
chaos: $(STAMP)
	$(MAKE) --no-print-directory deps
	CHAOS_SAGAS=$(CHAOS_SAGAS) CHAOS_SECURE_SAGAS=$(CHAOS_SAGAS) \
		$(PY) -m pytest tests/chaos -q --timeout 1800

# Benchmarks start their own throwaway broker and Jaeger; figures go to stdout as JSON lines.
# The soak (bench/soak.py) runs a 2-minute and a SOAK_MINUTES run, about SOAK_MINUTES + 5
# minutes in all; it writes bench/results/soak.json and bench/soak.png (matplotlib: the
# `bench` extra).
SOAK_MINUTES ?= 10
# Issue 12's suite (bench/perf): B1-B7 against raw aiokafka on a throwaway broker and Jaeger,
# about 20 minutes (PERF_ARGS=--quick: 3-4); writes bench/results/perf.json and the perf region
# of bench/REPORT.md.
PERF_ARGS ?=
bench: $(STAMP)
	$(MAKE) --no-print-directory deps
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m bench.perf all $(PERF_ARGS)
	$(PY) -m bench.bench_core
	$(PY) -m bench.bench_trust
	$(PY) -m bench.bench_sealing
	$(PY) -m bench.bench_engine --sagas 400 --window 50
	$(PY) -m bench.bench_rdkafka
	$(PY) -m bench.bench_tracing
	$(PY) -m bench.bench_rebuild
	$(PY) -m bench.bench_index
	$(PY) -m bench.bench_api --sagas 20 --cli-runs 5
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES) --window 200 --evict-after 30 \
		--tombstone-after 60

# Temporal, Restate and DBOS install themselves on the first run into ~/.cache/saga-engine/peers
# (a venv and an npm prefix of their own, ~30 s); the engine's figures come from bench.perf on a
# throwaway broker, in the same run. E.g. PEERS_ARGS="--only restate --seconds 5".
PEERS_ARGS ?=
bench-peers: $(STAMP)
	$(PY) -m deploy.kafka fetch
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m bench.peers $(PEERS_ARGS)

bench-perf: $(STAMP)
	$(MAKE) --no-print-directory deps
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m bench.perf all $(PERF_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist *.egg-info
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
