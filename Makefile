# Both targets create the virtual environment on first use (and refresh it when pyproject.toml changes).
VENV := .venv
STAMP := $(VENV)/.installed
PYTHON ?= python3

.PHONY: run test bench system-packages

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pneumofed simulate

# The deployment tests need nginx and the report test a headless Chromium: install them where we can
# (root with apt), else say what is missing.
system-packages:
	@if ! command -v nginx >/dev/null 2>&1; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	        echo "installing nginx for the deployment tests ..."; \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null \
	            || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null \
	            || echo "could not install nginx: the deployment tests will be skipped"; \
	    else \
	        echo "nginx not found: install it (e.g. 'sudo apt-get install nginx-light') to run the deployment tests"; \
	    fi; \
	fi
	@if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	        echo "installing chromium for the report.html browser test ..."; \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	            || echo "could not install chromium: the report.html browser test will be skipped"; \
	    else \
	        echo "chromium not found: install it (e.g. 'sudo apt-get install chromium') to run the report.html browser test"; \
	    fi; \
	fi

test: $(STAMP) system-packages
	$(VENV)/bin/python -m pytest

bench: $(STAMP)
	for script in benchmarks/bench_*.py; do $(VENV)/bin/python $$script || exit 1; done
