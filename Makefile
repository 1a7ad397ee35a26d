# Two entry points for a fresh Debian machine with Python 3.11:
#   make demo   sets up a virtual environment and runs the demo
#   make test   sets up the virtual environment with the dev extras and runs the tests
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch is pinned for the job SDK and kernels; this release's CPU build is
# what the test machines carry, and a range would pull a CUDA build.
CONSTRAINTS := constraints.txt

.PHONY: demo test lint proto venv clean

$(VENV)/.stamp-base: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[demo]'
	touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-base
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

venv: $(VENV)/.stamp-base

demo: $(VENV)/.stamp-base
	$(VENV)/bin/gpufleet demo
	$(VENV)/bin/gpufleet demo migrate
	$(VENV)/bin/gpufleet demo spot
	$(VENV)/bin/gpufleet simulate

test: $(VENV)/.stamp-dev
	$(VENV)/bin/pytest -q

lint: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

proto: $(VENV)/.stamp-dev
	$(PY) proto/generate.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
