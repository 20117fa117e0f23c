# Quick start: `make demo` (full pipeline under Prefect on the embedded synthetic cohort) and `make test`.
# Both create the virtualenv and install medtl on first use; re-running is safe and skips what is done.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medtl-installed
CONFIG ?= configs/demo.yaml
# Debian packages the tests need: a real Orthanc PACS with DICOMweb (started on loopback) and Chromium (renders the
# report headless); tests skip without them.
TEST_SERVICES := orthanc orthanc-dicomweb chromium

.PHONY: install demo test test-services clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --editable '.[dev]' --constraint constraints.txt
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m flows.pipeline --config $(CONFIG)

test: $(STAMP) test-services
	$(PY) -m pytest

test-services:
	@if [ -x /usr/sbin/Orthanc ] && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] && [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $(TEST_SERVICES) (Debian) for the PACS and report-rendering tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TEST_SERVICES) >/dev/null; \
	else echo "note: $(TEST_SERVICES) not installed and not root: the PACS and report-rendering tests will be skipped"; fi

clean:
	rm -rf runs .pytest_cache
