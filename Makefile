# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Each creates its own virtual environment with pip; torch is pinned so pip takes the CPU wheel.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.core: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH) -e .
	touch $@

# What `quantfw tour` needs: `example` writes its float checkpoint with transformers.
$(VENV)/.hf: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH) -e '.[hf]'
	touch $@ $(VENV)/.core

$(VENV)/.dev: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH) -e '.[dev,hf,ct,plot]'
	touch $@ $(VENV)/.core $(VENV)/.hf

demo: $(VENV)/.hf
	$(BIN)/quantfw tour

test: $(VENV)/.dev
	$(BIN)/ruff check quantfw tests
	$(BIN)/python -m pytest

lint: $(VENV)/.dev
	$(BIN)/ruff check quantfw tests
	$(BIN)/ruff format --check quantfw tests

clean:
	rm -rf $(VENV)
