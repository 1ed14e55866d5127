# loramerge — run `make help` for the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
TOOLS := .tools
BUF := $(TOOLS)/node_modules/.bin/buf
# vLLM flavour: CUDA when a GPU answers, the CPU build otherwise.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
VLLM_EXTRA := $(if $(HAS_GPU),gpu,cpu)
PYTEST_ARGS ?=

.PHONY: help setup install-runtime proto proto-check readme-settings lint test test-fast bench load demo serve deploy-check clean

help:
	@echo "make setup         create .venv and install everything (idempotent)"
	@echo "make demo          the whole workflow on locally built demo adapters"
	@echo "make serve         both services in the foreground on the demo assets"
	@echo "make test          proto freshness, lint, manifests, and the test suite"
	@echo "make bench         side-by-side benchmarks, appended to BENCHMARKS.md"
	@echo "make load          sustained load on the real stack (LOAD_SECONDS=90), appended to BENCHMARKS.md"
	@echo "make proto         regenerate Python from protos/"
	@echo "make deploy-check  render and validate the Kubernetes overlays"
	@echo "make install-runtime  the services only, no dev tools (container images; RUNTIME_EXTRAS=gpu,s3)"

setup: $(VENV)/.setup-done $(BUF)

$(VENV)/.setup-done: pyproject.toml clients/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	@# The client distribution first: the services depend on it for the contract.
	$(BIN)/pip install -q -e './clients[eval]'
	$(BIN)/pip install -q -e '.[$(VLLM_EXTRA),dev]'
	@# The unmodified LoRAX client the HTTP tests drive; --no-deps because its exact certifi and
	@# huggingface-hub<1.0 pins would disturb ours (its aiohttp, pydantic, requests are already here).
	$(BIN)/pip install -q --no-deps lorax-client==0.6.3
	@# PyPI's torchvision/torchaudio/torchcodec/triton are CUDA builds: importing
	@# transformers beside the CPU torch fails with them, and text generation needs none.
	$(if $(HAS_GPU),true,$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true)
	touch $@

# Container images (deploy/docker): the services and their runtime, no dev tools, not editable.
RUNTIME_EXTRAS ?= $(VLLM_EXTRA),s3

install-runtime:
	test -x $(PY) || python3 -m venv $(VENV)
	$(BIN)/pip install -q ./clients
	$(BIN)/pip install -q '.[$(RUNTIME_EXTRAS)]'
	$(if $(findstring gpu,$(RUNTIME_EXTRAS)),true,$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true)

$(BUF):
	mkdir -p $(TOOLS)
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) @bufbuild/buf@1.75.0

proto: setup
	@# Sources in protos/, the generated Python in the client distribution that owns the contract.
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=clients --pyi_out=clients --grpc_python_out=clients \
		protos/loramerge/v1/*.proto

readme-settings:
	$(PY) -m loramerge_common.settings_doc README.md merge=merge_service.settings:MergeSettings \
		inference=inference_service.settings:InferenceSettings

proto-check: setup
	BUF_CACHE_DIR=$(TOOLS)/buf-cache $(BUF) lint
	BUF_CACHE_DIR=$(TOOLS)/buf-cache $(BUF) format -d --exit-code
	@# The contract as first released (buf build -o protos/baseline-v1.binpb): changes must stay compatible.
	BUF_CACHE_DIR=$(TOOLS)/buf-cache $(BUF) breaking --against protos/baseline-v1.binpb

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

deploy-check: setup
	PATH=$(abspath $(BIN)):$$PATH bash deploy/check.sh

test: setup proto-check lint deploy-check
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/pytest -m "not e2e and not slow" $(PYTEST_ARGS)

# One torch thread: on a shared 2-core machine two threads stall each other and swing the ratios.
BENCH_THREADS ?= 1
bench: setup
	BENCH_THREADS=$(BENCH_THREADS) $(PY) -m benchmarks.run

LOAD_SECONDS ?= 90
LOAD_ARGS ?=

load: setup
	$(PY) -m benchmarks.load --seconds $(LOAD_SECONDS) $(LOAD_ARGS)

demo: setup
	$(PY) -m demo

serve: setup
	$(PY) -m demo.serve

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .ruff_cache .hypothesis
