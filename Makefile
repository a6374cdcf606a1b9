# One command each: `make install`, `make test`, `make up`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint up bench

install:  ## Virtualenv with Flywheel and its dev tools, plus Debian's chromium for the browser test.
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium; }

lint:  ## ruff and mypy, configured in pyproject.toml.
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint  ## Lint, then the whole suite (starts its own Kafka-protocol broker; needs PostgreSQL on 127.0.0.1:5432).
	$(BIN)/pytest

up:  ## The whole loop on this machine: broker, service, ingestion, worker.
	$(BIN)/flywheel up
