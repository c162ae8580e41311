# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint format clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) -m flash_jax.demo --workdir runs/demo

test: $(VENV)/.installed
	$(VENV)/bin/ruff check flash_jax tests benchmarks
	$(VENV)/bin/ruff format --check flash_jax tests benchmarks
	$(PY) -m pytest -q

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix flash_jax tests benchmarks
	$(VENV)/bin/ruff format flash_jax tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
