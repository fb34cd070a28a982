# moderator: one command for the tests, one for the demo. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
ARGS ?=

.PHONY: help setup system-deps test unit integration slow lint demo stack-up stack-down clean

help:
	@echo "make test    install everything (venv, torch $(TORCH_VERSION), the project, redis-server, Kafka) and run all tests"
	@echo "             (on Kafka 0.9; the every_broker ones again on Tansu)"
	@echo "make demo    run the main job on a local Kafka + Redis stack"
	@echo "make unit    unit tests only (no servers);  make lint    ruff and mypy"
	@echo "make slow    the larger calibration validity run (minutes)"

# System packages: redis-server and a Java runtime for the local stack's Kafka; chromium for the console's UI tests;
# g++ to build pdqhash (PyPI has no Linux wheel).
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v java >/dev/null 2>&1 || missing="$$missing default-jre-headless"; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v g++ >/dev/null 2>&1 || missing="$$missing g++"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	  else echo "please install:$$missing" >&2; exit 1; fi; \
	fi

# torch goes in first and pinned: a looser requirement on a machine without torch pulls the
# newest CUDA build (several GB). The project itself only asks for a lower bound.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python system-deps
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/moderator stack fetch

# Everything on Apache Kafka 0.9, then the broker tests again on Tansu (headers, idempotence, transactions).
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	MODERATOR_TEST_BROKER=tansu $(BIN)/python -m pytest -m every_broker $(PYTEST_ARGS)

unit: setup
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

integration: setup
	$(BIN)/python -m pytest -m integration $(PYTEST_ARGS)
	MODERATOR_TEST_BROKER=tansu $(BIN)/python -m pytest -m every_broker $(PYTEST_ARGS)

slow: setup
	$(BIN)/python -m pytest --slow -m slow $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check moderator tests benchmarks
	$(BIN)/ruff format --check moderator tests benchmarks
	$(BIN)/mypy

demo: setup
	$(BIN)/moderator demo $(ARGS)

stack-up:
	$(BIN)/moderator stack up

stack-down:
	$(BIN)/moderator stack down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .stack .moderator-stack.env
