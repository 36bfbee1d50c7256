# The two set-up commands a newcomer needs (see README.md): `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo demo-cluster panel panel-screenshots bench slow fuzz clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(VENV)/bin/python pyproject.toml
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(PY) -m simulators.demo

# The Administration Panel (docs/panel.md) on demo data with a gentle stream of traffic, until Ctrl-C:
# prints the URL, the admin password and the development CA.
panel: $(STAMP)
	$(PY) -m simulators.panel_demo

# Refresh docs/panel/*.png with the real-browser suite's screenshots (needs Debian's chromium).
panel-screenshots: $(STAMP)
	PANEL_SCREENSHOTS=docs/panel $(PY) -m pytest -q tests/test_panel_browser.py

# 3 NATS servers, a primary and a standby, steady load, kill -9 of the primary halfway (docs/operations.md).
demo-cluster: $(STAMP)
	$(PY) -m simulators.cluster_demo

bench: $(STAMP)
	$(PY) -m bench

# Coverage-guided fuzzing of ISO 8583 decoding and parsing (fuzz/iso_fuzz.py); not in `make test`.
# FUZZ_RUNS=10000 make fuzz for a short run.
FUZZ_RUNS ?= 1000000
fuzz: $(STAMP)
	$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install --quiet atheris
	FUZZ_RUNS=$(FUZZ_RUNS) $(PY) fuzz/iso_fuzz.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .fuzz
