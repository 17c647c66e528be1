# Both targets create the virtual environment on first use (and refresh it when pyproject.toml changes).
VENV := .venv
STAMP := $(VENV)/.installed
PYTHON ?= python3

.PHONY: run test bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pneumofed simulate

test: $(STAMP)
	$(VENV)/bin/python -m pytest

bench: $(STAMP)
	for script in benchmarks/bench_*.py; do $(VENV)/bin/python $$script || exit 1; done
