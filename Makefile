# `make demo`: what the library does, end to end on synthetic CT (fresh .venv, install, train, report).
# `make test` is the project's test command (README, .ci/run): fresh .venv, .[full,test], pytest on the JAX CPU backend.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEMO_WORKDIR ?= runs/demo

.PHONY: demo install test bench-tf clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[full,test]'
	touch $(STAMP)

$(RUNTIME_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[full]'
	touch $(RUNTIME_STAMP)

install: $(STAMP)

demo: $(RUNTIME_STAMP)
	$(PY) -m resdense_jax.main --config=configs/demo.py --workdir=$(DEMO_WORKDIR)
	$(PY) -m resdense_jax.reports --workdir=$(DEMO_WORKDIR)
	$(PY) -m resdense_jax.explain --checkpoint=$(DEMO_WORKDIR) --out=$(DEMO_WORKDIR)/explain \
	  --scan=$$(ls -d $(DEMO_WORKDIR)/synthetic_ct/validation/covid/*/ | head -n 1)
	@echo "demo: report in $(DEMO_WORKDIR)/report, explanation of one validation COVID scan in $(DEMO_WORKDIR)/explain"

test: $(STAMP)
	JAX_PLATFORMS=cpu KERAS_BACKEND=jax $(PY) -m pytest -n 2 --dist loadfile -q -m "not long" tests

# The Keras-on-TensorFlow reference of benchmarks/throughput.py, in an environment of its own (TensorFlow and
# JAX pin different versions of shared packages): --keras_python=.venv-tf/bin/python.
bench-tf:
	$(PYTHON) -m venv .venv-tf
	.venv-tf/bin/python -m pip install --quiet tensorflow-cpu keras numpy

clean:
	rm -rf $(VENV) .venv-tf build *.egg-info
