# `make serve` sets up .venv (Python 3.11) on first use and serves the bundled model;
# `make test` does the same set-up with the test extras and runs the test suite.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-test
RUNTIME_STAMP := $(VENV)/.installed

.PHONY: test serve install clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install -e ".[test]"
	touch $(STAMP)

$(RUNTIME_STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install -e .
	touch $(RUNTIME_STAMP)

install: $(STAMP)

serve: $(RUNTIME_STAMP)
	$(VENV)/bin/serve $(SERVE_ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist loadgroup -q -m "not gpu" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
