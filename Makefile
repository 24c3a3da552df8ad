# Thin doors: every target calls a Python entry point.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CUDA cluster picks its own build, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
EXP ?= debug_local
EXECUTOR ?=
ARGS ?=
SWEEP ?=
TOKENIZER := $(VENV)/share/gpt2-tokenizer/gpt2.tiktoken
PYDOC_SHARDS := data/pydoc/pydoc_val_000000.bin

.PHONY: setup fuse-lib test lint submit data-pydoc slurm-up slurm-down plot bench wheelhouse gpu-check device-rehearsal drill clean

setup: $(VENV)/.installed $(TOKENIZER)

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

$(TOKENIZER): | $(VENV)/.installed
	$(PY) -m gpt2.tokenizer install

# libfuse2, with which tests/failing_fs.py mounts a file system whose reads fail (Debian, Ubuntu; root)
fuse-lib:
	@ldconfig -p | grep -q 'libfuse\.so\.2 ' || { apt-get update -qq && \
	  { apt-get install -y -qq --no-install-recommends libfuse2 || \
	    apt-get install -y -qq --no-install-recommends libfuse2t64; }; }

test: setup
	$(VENV)/bin/pytest -q --durations=20

lint: setup
	$(VENV)/bin/ruff check .

data-pydoc: $(PYDOC_SHARDS)
$(PYDOC_SHARDS): | setup
	$(PY) data_prep/download.py --dataset pydoc --dir data/pydoc --shard_size 20000 --num_shards 8

submit: setup $(PYDOC_SHARDS)
	$(PY) launch/sweep.py jobs/$(EXP).yaml $(if $(EXECUTOR),--executor $(EXECUTOR),) $(ARGS)

slurm-up: setup
	bash slurm_templates/local-cluster/up.sh

slurm-down:
	bash slurm_templates/local-cluster/down.sh

plot: setup
	@test -n "$(SWEEP)" || { echo "usage: make plot SWEEP=runs/<sweep>" >&2; exit 2; }
	$(PY) launch/plot.py $(SWEEP) --out $(SWEEP)/loss.png

bench: setup $(PYDOC_SHARDS)
	$(PY) -m bench.run_all --out bench/RESULTS.md

# .wheels/: what the offline GPU machine lacks, as Python 3.12 wheels, plus the GPT-2 ranks file (bench/wheelhouse.py)
wheelhouse: setup
	$(PY) -m bench.wheelhouse

# The GPU machine's torch (a CUDA build, run on this CPU), its packages and .wheels/: the dry check and the GPU
# runs' command lines, before a GPU is lent (bench/device_rehearsal.py; downloads several GB once; not in CI)
device-rehearsal: wheelhouse
	$(PY) -m bench.device_rehearsal $(ARGS)

# On the GPU machine: python3 there has its own CUDA torch, and .wheels/ the rest (bench/gpu_check.py).
# GPU_CHECK_DRY=1: the same script end to end here, on the CPU with tiny shapes (.venv, no wheels).
GPU_SITE ?= /tmp/gpt2-gpu-site
GPU_CHECK_DRY ?=
ifneq ($(filter-out 0,$(GPU_CHECK_DRY)),)
gpu-check: setup
	PYTHONUNBUFFERED=1 PYTHONPATH=$(CURDIR) GPU_CHECK_DRY=1 $(PY) bench/gpu_check.py $(ARGS)
else
gpu-check:
	@test -f .wheels/gpt2.tiktoken || { echo "error: no .wheels/: run \`make wheelhouse\` where PyPI is reachable" >&2; exit 2; }
	rm -rf $(GPU_SITE) && $(PYTHON) -m pip install -q --no-index --no-deps --no-compile --target $(GPU_SITE) .wheels/*.whl
	PYTHONUNBUFFERED=1 PYTHONPATH=$(CURDIR):$(GPU_SITE) $(PYTHON) bench/gpu_check.py $(ARGS)
endif

drill: setup
	$(PY) launch/drill.py jobs/$(EXP).yaml $(ARGS)

clean:
	rm -rf runs/ .pytest_cache .ruff_cache
