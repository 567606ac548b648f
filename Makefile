# Two commands on a fresh machine; each creates the .venv it needs.
#   make demo   the bundled tiny trained model: generate with and without MTP (NumPy reference)
#   make test   the whole test suite (reference ops, model vs transformers, kernels on the CUDA simulator,
#               CUDA C compile check, notebooks)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test test-fast test-gpu notebooks bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.core: pyproject.toml | $(PY)
	$(PIP) install -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(PY)
	$(PIP) install -e '.[dev,oracle,notebooks]'
	touch $@ $(VENV)/.core

demo: $(VENV)/.core
	$(VENV)/bin/nemo-scratch demo

# Without a GPU, tests/gpu_harness.py switches numba to the CUDA simulator; with one, the gpu tests run.
test: $(VENV)/.dev
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --nbmake notebooks

# Without the transformers oracle and notebooks: the quick inner loop.
test-fast: $(VENV)/.dev
	$(PY) -m pytest -q -m "not oracle and not slow" tests

# On a machine with a CUDA GPU (install the gpu-cuda12 or gpu-cuda13 extra first).
test-gpu: $(VENV)/.dev
	$(PY) -m pytest -q -m gpu tests

# Execute every notebooks/NN_*.py source and write its .ipynb with the outputs (committed: readable without
# running anything). Run it after editing a notebook; tests/test_notebooks_pairing.py fails on a stale one.
notebooks: $(VENV)/.dev
	$(PY) tools/execute_notebooks.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
