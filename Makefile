# Two entry points, each doing all of its own set-up on a fresh machine:
#   make quickstart   harvest -> train -> eval on the built-in model (a few minutes on 2 CPU cores)
#   make test         the test suite (what CI runs)
# The virtualenv is (re)built whenever pyproject.toml changes. torch is installed FIRST and pinned, so pip never
# resolves an unpinned torch (which would pull gigabytes of CUDA packages); override TORCH for another build.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: quickstart test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

quickstart: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/quickstart.sh

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) cache/runs
