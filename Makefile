# Quick start: `make demo` (full pipeline under Prefect on the embedded synthetic cohort) and `make test`.
# Both create the virtualenv and install medtl on first use; re-running is safe and skips what is done.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medtl-installed
CONFIG ?= configs/demo.yaml

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --editable '.[dev]' --constraint constraints.txt
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m flows.pipeline --config $(CONFIG)

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf runs .pytest_cache
