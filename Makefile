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

.PHONY: env assets llama-cpp test test-fast lint format demo bench-quant bench-reference clean-env serve bench-pipeline \
	mlflow-ui prefect-ui verify bench-export bench-fold bench-eval testbed bench-quality bench-harness check-results \
	bench-reliability bench-screenshots chromium bench-distributed bench-scale synthetic-models bench-transfer

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

# The pipeline's stages run `python -m stages.<name>`: the venv's python must come first on PATH.
RUN_PIPELINE := PATH="$(CURDIR)/$(BIN):$$PATH"
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000

# The pipeline as the Prefect flow ramp-pipeline: one task per DVC stage (`dvc repro -s`, so DVC's caching holds),
# every stage that ran logged to MLflow (mlflow.db), the trained policy registered and sent through the champion
# gate; ends with the results table (llama.cpp presets beside RAMP), the GGUF, the report and the UIs to open.
demo: env assets llama-cpp
	$(RUN_PIPELINE) $(BIN)/python -m flows.pipeline --demo

# The team's services on one machine: the Prefect server (flow runs, the retrain-policy deployment with the cron of
# params.yaml) and the MLflow tracking server (sqlite backend mlflow.db, artifacts served from mlartifacts/), which
# every machine of a team points MLFLOW_TRACKING_URI at. SERVE_HOST=0.0.0.0 to accept other machines.
SERVE_HOST ?= 127.0.0.1
serve: env
	@echo "== Prefect on http://$(SERVE_HOST):$(PREFECT_PORT), MLflow on http://$(SERVE_HOST):$(MLFLOW_PORT); serving retrain-policy"
	$(BIN)/mlflow server --host $(SERVE_HOST) --port $(MLFLOW_PORT) --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--artifacts-destination $(CURDIR)/mlartifacts --serve-artifacts & mlflow=$$!; \
	$(BIN)/prefect server start --host $(SERVE_HOST) --port $(PREFECT_PORT) & server=$$!; \
	trap "kill $$server $$mlflow" EXIT INT TERM; \
	for url in http://127.0.0.1:$(PREFECT_PORT)/api/health http://127.0.0.1:$(MLFLOW_PORT)/health; do \
	for i in $$(seq 120); do $(BIN)/python -c "import urllib.request as u; u.urlopen('$$url')" 2>/dev/null && break; \
	sleep 1; done; done; \
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT) \
		$(RUN_PIPELINE) $(BIN)/python -m flows.serve

prefect-ui: env
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

mlflow-ui: env
	$(BIN)/mlflow ui --host 127.0.0.1 --port $(MLFLOW_PORT) --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--default-artifact-root $(CURDIR)/mlartifacts

# Debian's Chromium for the screenshot benchmarks (a browser test tool's own download cannot run here).
APT := $(if $(filter 0,$(shell id -u)),apt-get,sudo apt-get)
chromium:
	@command -v chromium >/dev/null || { $(APT) update -qq && $(APT) install -y -qq chromium; }

# A cold `make demo` on a fresh clone (~15 min on 2 cores), a no-op rerun, a budget change, then screenshots of
# the report, the MLflow champion and the Prefect flow run (docs/*.png, each page checked for the run's numbers).
bench-pipeline: env assets llama-cpp chromium
	$(RUN_PIPELINE) $(BIN)/python benchmarks/pipeline.py --out results/pipeline.json --lock dvc.lock

# Screenshots of this checkout's last `make demo` (report, MLflow champion, Prefect flow run) into docs/.
bench-screenshots: env chromium
	$(BIN)/python benchmarks/screenshots.py --project . --docs docs --out results/screenshots.json

bench-quant: env assets llama-cpp
	$(BIN)/python benchmarks/quantizers.py --out results/quantizers.json

clean-env:
	rm -rf $(VENV)

bench-reference: env assets llama-cpp
	$(BIN)/python benchmarks/reference_ppl.py --out results/reference_ppl.json

# Issue 8: exported files checked by llama.cpp itself. VERIFY_GGUF defaults to the pipeline's export.
VERIFY_GGUF ?= data/export/model.gguf
VERIFY_REF ?= data/bench/export/smollm2-f32.gguf

$(VERIFY_REF): | env assets
	mkdir -p $(dir $@)
	$(BIN)/ramp export smollm2 --type F32 --out $@

verify: env assets llama-cpp $(VERIFY_REF)
	@test -f $(VERIFY_GGUF) || { echo "no $(VERIFY_GGUF): run 'make demo' (or dvc repro) first, or pass VERIFY_GGUF=file.gguf"; exit 1; }
	$(BIN)/ramp verify $(VERIFY_GGUF) --reference $(VERIFY_REF)

bench-export: env assets llama-cpp
	$(BIN)/python benchmarks/export.py --out results/export.json
	$(BIN)/python benchmarks/export.py --out results/export.json --imatrix-identity

# Issue 5/6 benchmarks (numbers in results/, each file names its command).
bench-fold: env assets
	$(BIN)/python benchmarks/folding.py --out results/folding.json --alphas 0.3,0.5 --calib-seqs 8 --eval-seqs 4

bench-eval: env assets llama-cpp
	$(BIN)/python benchmarks/eval_check.py --chunks 10 --commonsense 200 --out results/eval_check.json

bench-harness: env assets
	$(BIN)/python benchmarks/harness_check.py --n 200 --out results/harness_check.json

testbed: env assets
	$(BIN)/python benchmarks/train_testbed.py --out results/testbed.json

# RAMP vs the measured-sensitivity, gradient and evolutionary allocators and llama.cpp at equal bytes: the pipeline
# itself with param overlays (results/quality.json, recipes in results/recipes/quality/); check-results rebuilds a
# sample of those files and re-measures them with llama-perplexity. SmolLM2 ~25 min per budget on 2 cores.
# benchmarks/quality.py also has gemma3 and testbed overlays: the testbed (an HF directory) exports without
# tokenizer.ggml.* keys, which llama-perplexity refuses (issue 18); gemma3 has not been run yet.
bench-quality: env assets llama-cpp
	$(BIN)/python benchmarks/quality.py --model smollm2

# Issue 17: zero-shot transfer, leave-one-family-out: a policy pooled on the other families (train.sources,
# include_target false) allocates the target with no evaluation on it, against the target's own policy and the
# zero-evaluation baselines (results/transfer.json, recipes in results/recipes/transfer/). The rows the README leads
# with: the residual policy's prior priced by the pool's role gains (allocate.walk auto), which does not depend on
# the SAC seed, so one seed; SmolLM2 at three budgets ~1.5 h, Gemma-3 at two ~2 h on 2 cores. cost_gains.py then
# prices SmolLM2's and Gemma-3's prepared tables with each other's role gains (results/cost_gains.json, ~40 s).
# The --cost-basis fisher rows price the matrices by the target's own Fisher table (no evaluation; the pool gives the
# embedding's price only; ~30 min SmolLM2, ~40 min Gemma-3), cost_gains.py --fisher scores that table (~1 min).
bench-transfer: env assets llama-cpp
	$(BIN)/python benchmarks/transfer.py --target smollm2 --seeds 0 --cost-gain role \
		--allocate '{"walk": "prior", "embedding_type": "predicted"}'
	$(BIN)/python benchmarks/transfer.py --target gemma3 --seeds 0 --cost-gain role \
		--allocate '{"walk": "prior", "embedding_type": "predicted"}'
	$(BIN)/python benchmarks/transfer.py --target smollm2 --seeds 0 --zero-shot-only --cost-gain role --cost-basis fisher \
		--allocate '{"walk": "prior", "embedding_type": "predicted"}'
	$(BIN)/python benchmarks/transfer.py --target gemma3 --seeds 0 --zero-shot-only --cost-gain role --cost-basis fisher \
		--allocate '{"walk": "prior", "embedding_type": "predicted"}'
	$(BIN)/python benchmarks/cost_gains.py --out results/cost_gains.json
	$(BIN)/python benchmarks/cost_gains.py --fisher --workspace $(HOME)/.cache/ramp/bench/transfer/smollm2 \
		--target-workspace $(HOME)/.cache/ramp/bench/quality/smollm2 --out results/cost_gains_fisher.json
	$(BIN)/python benchmarks/cost_gains.py --embedding --target-workspace $(HOME)/.cache/ramp/bench/quality/smollm2 \
		--out results/cost_gains_embedding.json

# Issue 19: the sensitivity measurement on SmolLM2 in-process vs a local Dask cluster of 2 single-threaded workers
# (Prefect flow sensitivity-fanout, one task per block): seconds, tasks, bit identity (results/distributed.json).
# Issue 18: synthetic bf16 Llamas (0.13B, 1.1B, 7B shapes; ~16 GB in ~/.cache/ramp/synthetic/, ~3 min) and every
# product stage on them as its own process: peak RSS and seconds per stage (~1.5 h on 2 cores, most of it 7B)
synthetic-models: env assets
	for s in 0.13B 1.1B 7B; do $(BIN)/python benchmarks/synthetic_llama.py --shape $$s || exit 1; done

bench-scale: env assets llama-cpp synthetic-models
	$(BIN)/python benchmarks/scale.py --out results/scale.json
	$(BIN)/python benchmarks/scale.py --fold --shapes 0.13B,1.1B --out results/scale_fold.json

bench-distributed: env assets
	$(BIN)/python benchmarks/distributed.py --workers 2 --threads-per-worker 1 --out results/distributed.json

# Issue 20: fuzz every reader, the CLI and params; kill -9 inside every stage; race promotions
# (results/reliability.json; about 25 minutes on 2 cores; exits 1 when a count that must be 0 is not).
bench-reliability: env assets
	$(BIN)/python benchmarks/reliability.py --out results/reliability.json

check-results: env assets llama-cpp
	$(BIN)/python benchmarks/check_results.py --sample 3
