# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv themselves
# (demo: runtime requirements; test: + the PyTorch references and tools).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test docs docs-check lint format clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

demo: $(VENV)/.runtime
	$(PY) -m flash_jax.demo --workdir runs/demo

test: $(VENV)/.dev docs-check
	$(VENV)/bin/ruff check flash_jax tests benchmarks configs launch docs/render.py
	$(VENV)/bin/ruff format --check flash_jax tests benchmarks configs launch docs/render.py
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -n auto --dist loadfile --durations=15

# The measured figures of README.md and docs/*.md, rendered from the JSON artifacts they name
# (standard library only: no venv needed). docs-check changes nothing and fails on drift.
docs:
	$(PYTHON) docs/render.py

docs-check:
	$(PYTHON) docs/render.py --check

format: $(VENV)/.dev
	$(VENV)/bin/ruff check --fix flash_jax tests benchmarks configs launch
	$(VENV)/bin/ruff format flash_jax tests benchmarks configs launch

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
