# Two commands do all the set-up: `make up` runs the whole loop, `make test` lints and runs the suite.
# Each first installs what is missing or stale; a second run reinstalls nothing that is current.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Touched after a successful install, inside the venv so that deleting the venv also forgets the install.
INSTALLED := $(VENV)/.installed
BENCH ?= serve

.PHONY: install test lint up bench

install: $(INSTALLED)  ## Virtualenv with Flywheel and its dev tools, plus Debian's chromium (the browser test) and wordnet-base (the thesaurus of synonym augmentation).

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || { $(PYTHON) -m venv $(VENV) && $(BIN)/pip install --upgrade pip; }
	$(BIN)/pip install -e ".[dev]"
	command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium; }
	test -f /usr/share/wordnet/index.noun || { apt-get update -qq && apt-get install -y -qq --no-install-recommends wordnet-base; }
	touch $@

lint: $(INSTALLED)  ## ruff, mypy and the import-layers contract, configured in pyproject.toml.
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: $(INSTALLED) lint  ## Lint, then the whole suite (starts its own Kafka-protocol broker; needs PostgreSQL on 127.0.0.1:5432).
	$(BIN)/pytest

up: $(INSTALLED)  ## The whole loop on this machine: broker, migrations, first model, service, ingestion, worker.
	$(BIN)/flywheel up

bench: $(INSTALLED)  ## One script under benchmarks/: make bench BENCH=train ARGS="--data ../shared/data/rotten_tomatoes.csv".
	$(BIN)/python benchmarks/$(BENCH)_bench.py $(ARGS)
