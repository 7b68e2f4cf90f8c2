# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv demo test lint bench clean

$(BIN)/opd: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(BIN)/opd

venv: $(BIN)/opd

demo: venv
	$(BIN)/opd demo

test: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest

bench: venv
	$(BIN)/python bench/objective_memory.py

clean:
	rm -rf $(VENV) build src/*.egg-info
