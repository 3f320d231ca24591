# RAMP — every target that needs the environment builds it first, so a fresh clone needs only
# `make demo` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ramp-installed

# Offline: nothing may try a hub or phone home (SPEC §9).
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: env assets llama-cpp test test-fast lint format demo bench-quant bench-reference clean-env

$(STAMP): pyproject.toml
	@echo "== creating $(VENV) with the pinned stack (torch 2.13.0 from the local wheel)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip check
	@touch $@

env: $(STAMP)

assets: env
	$(BIN)/ramp assets

llama-cpp: env
	PIP="$(BIN)/pip" bash scripts/build_llama_cpp.sh

test: env assets llama-cpp
	$(BIN)/pytest tests

test-fast: env assets
	$(BIN)/pytest tests -m "not slow"

lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: env
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: env assets llama-cpp
	$(BIN)/ramp info $$($(BIN)/python -c "from ramp.assets import smollm2_gguf_path; print(smollm2_gguf_path())")
	$(BIN)/ramp perplexity smollm2 --chunks 40

bench-quant: env assets llama-cpp
	$(BIN)/python benchmarks/quantizers.py --out results/quantizers.json

clean-env:
	rm -rf $(VENV)

bench-reference: env assets llama-cpp
	$(BIN)/python benchmarks/reference_ppl.py --out results/reference_ppl.json
