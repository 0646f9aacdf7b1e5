# facecluster: `make train` and `make test` are all a fresh clone needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help install train smoke test lint clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

# a .venv without pip (a venv that failed half-way: no python3-venv) is made again
$(STAMP): pyproject.toml
	$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); } || { rm -rf $(VENV); exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,onnx,slurm]"
	touch $(STAMP)

install: $(STAMP)  ## create/reuse .venv and install facecluster with its test tools and the onnx and slurm extras

train: $(STAMP)  ## train the full method on the bundled LFW demo set and print the results table
	$(PY) train.py $(ARGS)

smoke: $(STAMP)  ## both stages in about a minute (configs/smoke.yaml)
	$(PY) train.py -c configs/smoke.yaml $(ARGS)

# one worker process per core, each test file in one worker (its module fixtures train once)
test: $(STAMP)  ## run the test suite
	$(PY) -m pytest -n auto --dist loadfile --no-loadscope-reorder $(ARGS)

lint: $(STAMP)  ## ruff lint and format check
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:  ## remove runs and caches (keeps .venv)
	rm -rf runs lightning_logs .pytest_cache .ruff_cache
