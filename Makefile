# make run / make test create the virtual environment they need from nothing, and install the
# system packages they need when missing (scripts/system-deps.sh: apt as root or with sudo,
# otherwise one line naming them).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PREFIX ?= /opt/edge-agent

.PHONY: venv system-deps run test bench screenshots install uninstall clean

venv: $(STAMP)

$(STAMP): setup.py
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required (tomllib)"'
	@PYTHON=$(PYTHON) bash scripts/system-deps.sh venv
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[edge,train,fleet,test]'
	touch $(STAMP)

run: venv
	$(VENV)/bin/edge-agent run --config agent/agent.local.toml

# mosquitto, PostgreSQL, chromium, systemd-analyze for the integration tests
system-deps:
	@PYTHON=$(PYTHON) bash scripts/system-deps.sh test

test: venv system-deps
	$(PY) -m pytest -q tests

bench: venv
	$(PY) bench/footprint.py

# README images: a NAB series replayed through the real detector and forecaster, rendered by chromium
screenshots: venv
	$(PY) bench/screenshots.py

install:
	sudo PREFIX=$(PREFIX) PYTHON=$(PYTHON) bash systemd/install.sh install

uninstall:
	sudo PREFIX=$(PREFIX) bash systemd/install.sh uninstall

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache state
