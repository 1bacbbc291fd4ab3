# Set-up and checks for glmrepl. `make install` then `make test` on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Installed before the package so that pip keeps this build and never pulls
# a CUDA-flavoured torch as a dependency of transformers or accelerate.
TORCH_PIN ?= torch==2.13.0

.PHONY: install test lint demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_PIN)"
	$(PIP) install --quiet -e ".[dev,serve,adapters]"
	touch $@

test: install lint
	$(PY) -m pytest

# Lint, format and type checks; part of `make test`.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

demo: install
	$(PY) -m glmrepl.demo

bench: install
	$(PY) benchmarks/run.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/multiturn.py
	$(PY) benchmarks/quant_models.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
