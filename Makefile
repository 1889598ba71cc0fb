# fedmdh: set-up, the main job on the built-in default, and the tests.
#   make demo   creates .venv, installs fedmdh, trains FedAvg on the built-in default federation
#   make test   creates .venv, installs fedmdh with test extras, runs the test suite
# TORCH_SPEC picks the PyTorch build (a bare "torch" can resolve to a multi-GB CUDA build).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# the shared copy beside the checkout, when there is one (else $FEDMDH_DATA_DIR, the cache, a download, or the synthetic fallback)
DATA_DIR ?= $(wildcard ../shared/datasets/fedmdh_perovskite_split)
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/fedmdh demo --out $(DEMO_OUT) $(if $(DATA_DIR),--data-dir $(DATA_DIR),)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/simulator_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
