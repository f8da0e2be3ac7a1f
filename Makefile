# Set-up and everyday commands. `make demo` and `make test` create the environment
# first when it is missing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build by default; on a GPU machine pass the build you need, for example
# make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
DEMO_DIR ?= .cache/demo/lgg
PYTEST_ARGS ?=

.PHONY: env demo demo-data test test-slow bench clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e ".[test]"
	touch $@

demo-data: env
	$(BIN)/python -m data_modules.demo --out $(DEMO_DIR)

demo: demo-data
	$(BIN)/python -m morpheus_pl fit --config experiments/demo/pretrain.yaml

test: env
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: env
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

bench: env
	$(BIN)/python -m morpheus_pl.benchmarks --out docs/benchmarks.md

clean:
	rm -rf $(VENV) runs .pytest_cache
