# fedmdh: set-up, the main job on the built-in default, and the tests.
#   make demo   creates .venv, installs fedmdh, trains FedAvg on the built-in default federation
#   make test   creates .venv, installs fedmdh with test extras, anvil (the EVM node of the ledger's and the
#               deployment's tests, with npm into .tools/), Debian's chromium (the browser tests) and .venv-fhe
#               (OpenFHE for the --secure tests: its wheel imports on CPython 3.10 only), runs every test
# TORCH_SPEC picks the PyTorch build (a bare "torch" can resolve to a multi-GB CUDA build).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# the shared copy beside the checkout, when there is one (else $FEDMDH_DATA_DIR, the cache, a download, or the synthetic fallback)
DATA_DIR ?= $(wildcard ../shared/datasets/fedmdh_perovskite_split)
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=
# a real EVM node for tests/test_ledger_anvil.py, project-local; give FEDMDH_ANVIL=/path/to/anvil to use another
ANVIL_VERSION ?= 1.7.1
TOOLS ?= .tools
FEDMDH_ANVIL ?=
ANVIL_STAMP := $(TOOLS)/.anvil-$(ANVIL_VERSION)

# OpenFHE (threshold CKKS, --secure) in its own venv: openfhe 1.6.1.0.22.4's wheel holds a CPython 3.10
# extension. PYTHON_FHE: a python3.10 (PATH, else pyenv's); without one the secure tests skip, saying why.
OPENFHE_SPEC ?= openfhe==1.6.1.0.22.4
FHE_VENV ?= .venv-fhe
PYTHON_FHE ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10) $(shell python3.10 -c "import sys; print(sys.executable)" 2>/dev/null))

# Debian's chromium for the task service's browser tests (Playwright drives /usr/bin/chromium; no browser download)
CHROMIUM ?= /usr/bin/chromium

.PHONY: install anvil chromium openfhe demo lint test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

$(ANVIL_STAMP):
	@command -v npm >/dev/null || { echo "make test needs npm (Node.js) to install anvil $(ANVIL_VERSION) into $(TOOLS)/, or FEDMDH_ANVIL=/path/to/anvil" >&2; exit 1; }
	npm install --prefix $(TOOLS) --no-audit --no-fund "@foundry-rs/anvil@$(ANVIL_VERSION)"
	touch $@

anvil: $(ANVIL_STAMP)

chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
		else echo "no $(CHROMIUM) and no root apt-get: the browser tests will be skipped (apt-get install chromium)" >&2; fi; \
	fi

$(FHE_VENV)/.installed:
	@if [ -z "$(PYTHON_FHE)" ]; then echo "no python3.10 for $(FHE_VENV): the --secure tests will be skipped (give PYTHON_FHE=/path/to/python3.10)" >&2; \
	else $(PYTHON_FHE) -m venv $(FHE_VENV) && $(FHE_VENV)/bin/python -m pip install --quiet "$(OPENFHE_SPEC)" "numpy>=1.26,<2.3" \
		&& $(FHE_VENV)/bin/python -c "import openfhe" && touch $@ \
		|| echo "$(FHE_VENV): $(OPENFHE_SPEC) did not install or import: the --secure tests will be skipped" >&2; fi

openfhe: $(FHE_VENV)/.installed

demo: install
	$(BIN)/fedmdh demo --overwrite --out $(DEMO_OUT) $(if $(DATA_DIR),--data-dir $(DATA_DIR),)

# the layers of docs/architecture.md (.importlinter): no package imports one above it
lint: install
	$(BIN)/lint-imports

test: install lint chromium openfhe $(if $(FEDMDH_ANVIL),,anvil)
	FEDMDH_OPENFHE_PYTHON="$(or $(FEDMDH_OPENFHE_PYTHON),$(wildcard $(CURDIR)/$(FHE_VENV)/bin/python))" \
	FEDMDH_ANVIL="$(or $(FEDMDH_ANVIL),$$(ls $(TOOLS)/node_modules/@foundry-rs/anvil-*/bin/anvil | head -n 1))" \
		$(BIN)/python -m pytest $(PYTEST_ARGS)

# the fast tier: no deployment, OpenFHE, browser or anvil test and none that trains for minutes (tests/conftest.py TIERS)
test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/simulator_overhead.py

clean:
	rm -rf $(VENV) $(FHE_VENV) runs .pytest_cache
