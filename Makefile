# `make test` sets up .venv (Python 3.11) on first use and runs the test suite.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-test

.PHONY: test install clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile -q -m "not gpu" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
