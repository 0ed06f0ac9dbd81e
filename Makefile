# The README's commands. Each one creates or refreshes the virtual environment
# it needs, and runs .venv/bin/python directly, so nothing has to be activated.
#
#   make demo        the main job
#   make test        the quick tests (what CI runs first)
#   make test-slow   the tests marked slow (CI runs them after)
#   make install     only the environment
#
# Two stamps: the packages are reinstalled when requirements.txt or
# pyproject.toml change; flashcore itself (and its C++ extension) is rebuilt
# when setup.py or anything under csrc/ changes as well.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps.stamp
STAMP := $(VENV)/.stamp
CSRC := $(shell find csrc -type f 2>/dev/null)

.PHONY: install demo test test-slow

# torch first, from its CPU wheel: with torch already there, the requirements
# (diffusers...) do not pull a CUDA build of it.
$(DEPS_STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# --no-build-isolation: build against the torch installed above (isolation
# would fetch a CUDA torch into the build environment).
$(STAMP): $(DEPS_STAMP) setup.py $(CSRC)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m flashcore demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# make gpu-check: the whole GPU verification (build, GPU tests, benchmarks) on one
# H100/H200 in at most 8 minutes; bench/gpu_check.py and docs/gpu.md say what it runs.
# No venv step: on a GPU machine the Python that holds a CUDA torch is the system's
# (GPU_PYTHON=...); here .venv's. GPU_CHECK_ARGS: e.g. --dry-run, --out-dir DIR.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
.PHONY: gpu-check
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)
