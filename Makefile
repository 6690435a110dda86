# vpdetect developer and user entry points.
#   make test   - create .venv, install vpdetect with its test tools, run the tests
#   make demo   - simulate a held-out tomogram, pick it with the bundled models, score it
#   make gpu-check - on a CUDA machine: GPU tests, precisions, pick and training timings -> JSON
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out

.PHONY: install test demo lint bench models gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch==2.13.0 first: the CPU build on the machine, instead of several GB of CUDA wheels.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check vpdetect tests benchmarks

bench: $(STAMP)
	$(PY) -m benchmarks

demo: $(STAMP)
	$(BIN)/python examples/demo.py --out $(DEMO_DIR)

# No venv needed: runs vpdetect from this checkout with a Python that has torch and the
# dependencies (the .venv when there is one, else $(PYTHON)); see README, "GPU".
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_REPORT ?= gpu_check.json
gpu-check:
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(GPU_PYTHON) benchmarks/gpu_check.py --out $(GPU_REPORT)

models: $(STAMP)
	bash examples/train_default_models.sh

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache gpu_check.json
