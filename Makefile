# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# The CPU build of torch is installed first so that pip never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install demo serve test lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,trl,deepspeed]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/kernelscope demo

serve: install
	$(BIN)/kernelscope serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

bench: install
	$(BIN)/python bench/sketch.py
