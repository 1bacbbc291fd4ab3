# Set-up and checks for glmrepl. `make install` then `make test` on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Installed before the package so that pip keeps this build and never pulls
# a CUDA-flavoured torch as a dependency of transformers or accelerate.
TORCH_PIN ?= torch==2.13.0
# The versions the tests passed with; setup.cfg keeps the ranges for pip users.
CONSTRAINTS := constraints.txt
EXTRAS := dev,serve,adapters
# Installed without their dependencies: xgrammar (response formats) would pull in triton, 1 GB
# that masks tokens on GPUs only (a CUDA build of torch brings its own).
WITHOUT_DEPS := xgrammar apache-tvm-ffi

.PHONY: install lock test lint demo bench bench-env bench-smoke clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg setup.py $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c $(CONSTRAINTS) pip
	$(PIP) install --quiet -c $(CONSTRAINTS) "$(TORCH_PIN)"
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	$(PIP) install --quiet --no-deps -c $(CONSTRAINTS) $(WITHOUT_DEPS)
	touch $@

# Refresh the tested set on purpose: the newest releases within setup.cfg's ranges, in a
# scratch environment, recorded in $(CONSTRAINTS). Run `make clean install test` after it.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet "$(TORCH_PIN)"
	.venv-lock/bin/python -m pip install --quiet --upgrade -e ".[$(EXTRAS)]"
	.venv-lock/bin/python -m pip install --quiet --upgrade --no-deps $(WITHOUT_DEPS)
	.venv-lock/bin/python scripts/lock_versions.py .venv-lock $(CONSTRAINTS)
	rm -rf .venv-lock

# Two workers, a test file each at a time (module fixtures such as a started server stay shared).
test: install lint
	$(PY) -m pytest -n 2 --dist loadfile

# Lint, format, type and import-layer checks (.importlinter); part of `make test`.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

demo: install
	$(PY) -m glmrepl.cli.demo

bench: install
	$(PY) benchmarks/run.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/scheduling.py
	$(PY) benchmarks/kv_memory.py
	$(PY) benchmarks/multiturn.py
	$(PY) benchmarks/quant_models.py
	$(PY) benchmarks/structured.py

# llama.cpp, built once on this machine for `make bench` to time beside glmrepl
# (benchmarks/llama_env.py; about 20 minutes on two cores; needs cmake and ninja).
bench-env: install
	$(PY) benchmarks/llama_env.py

# The same scripts on a tiny checkpoint, to show they still run (benchmarks/README.md); the
# figures they print are not measurements.
bench-smoke: install
	$(PY) benchmarks/run.py --smoke
	$(PY) benchmarks/serve.py --smoke
	$(PY) benchmarks/multiturn.py --smoke
	$(PY) benchmarks/quant_models.py --smoke
	$(PY) benchmarks/scheduling.py --smoke
	$(PY) benchmarks/kv_memory.py --smoke
	$(PY) benchmarks/structured.py --smoke

clean:
	rm -rf $(VENV) .venv-lock build *.egg-info .pytest_cache
