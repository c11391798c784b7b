# `make test` is the project's test command (README, .ci/run): fresh .venv, .[test], pytest on the JAX CPU backend.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export JAX_PLATFORMS ?= cpu
export KERAS_BACKEND ?= jax

.PHONY: install test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q tests

clean:
	rm -rf $(VENV) build *.egg-info
