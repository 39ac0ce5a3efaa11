# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test bench lint wheel-test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch (a test peer only); a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/sra-jax demo

test: setup
	$(PY) -m pytest -n 2 --dist loadfile -q --durations=25

bench: setup
	$(VENV)/bin/sra-jax bench

lint: setup
	$(PY) -m ruff check sra_jax pallas_kernels tests

# Build the wheel, install it into a fresh venv outside the checkout and run the documented commands (CI runs it).
wheel-test:
	bash .ci/wheel-test $(PYTHON)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
