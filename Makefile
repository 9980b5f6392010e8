# Everyday commands. `make setup` once, then `make demo`, `make test`, `make lint`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint format

setup:
	python3 -m venv $(VENV) && $(VENV)/bin/pip install -q torch==2.13.0 && $(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'

demo:
	$(VENV)/bin/vlm-train experiment=toy

test:
	$(PY) -m pytest

test-fast:
	$(PY) -m pytest -m "not slow"

lint:
	$(VENV)/bin/ruff check vlm_train tests launch bench
	$(VENV)/bin/ruff format --check vlm_train tests launch bench

format:
	$(VENV)/bin/ruff format vlm_train tests
	$(VENV)/bin/ruff check --fix vlm_train tests
