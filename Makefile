# Everyday commands. `make setup` once, then `make demo`, `make test`, `make lint`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint typecheck format lock

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

typecheck:
	$(PY) -m mypy

format:
	$(VENV)/bin/ruff format vlm_train tests
	$(VENV)/bin/ruff check --fix vlm_train tests

# Rewrite the lock (constraints.txt) from this venv, after the suite passed with it: its header
# stays, the project itself and the local torch label (+cpu) are left out.
lock:
	{ sed -n '/^#/p;/^#/!q' constraints.txt; $(VENV)/bin/pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
