# asr-ft — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch: this machine provides the 2.13 CPU wheel; override e.g. TORCH_SPEC='torch==2.11.*' for another build.
TORCH_SPEC ?= torch==2.13.0
APT_PACKAGES := espeak-ng sox libsndfile1 chromium fonts-wqy-microhei
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup system-deps test test-slow test-faults test-gpu demo lint clean-demo e2e-containers

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  make %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

system-deps: ## install espeak-ng, sox, libsndfile, chromium + a CJK font (the report test) through apt when missing
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	$(MAKE) --no-print-directory system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "deepspeed>=0.16,<1"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: system-deps $(STAMP) ## create .venv with everything (apt packages included; a missing one is installed even when .venv is up to date)

test: setup ## run the fast test suite (unit + integration; < 10 min on 2 cores)
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q --durations=15

test-slow: setup ## run the slow tests too
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -m "slow" --durations=15

FAULTS_ARGS ?=
test-faults: setup ## the whole fault matrix (tests/faults: kill -9 at every publish point, SIGTERM, S3 outages, locks)
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -m "slow or not slow" tests/faults --durations=10 $(FAULTS_ARGS)

test-gpu: setup ## GPU tests (on a CUDA machine): pytest -m gpu tests/gpu
	$(BIN)/pytest -q -m gpu tests/gpu

# Real Mandarin speech for the demo, each a folder holding transcripts.csv (audio_id,text) + audio/:
#   ASRFT_REAL_ZH_DEV=DIR   a dev set the report scores beside the demo test set
#   ASRFT_REAL_ZH_DEV2=DIR  general speech for finetune's forgetting guard (its guard split chooses the model)
# ASRFT_REAL_ZH_DEV has no default (without it the report scores the demo test set and the guard's set only);
# ASRFT_REAL_ZH_DEV2 defaults to the development set beside this checkout (../shared/data/real-zh-dev2) when it
# exists; without it the guard is skipped with a warning.
ASRFT_REAL_ZH_DEV ?=
ASRFT_REAL_ZH_DEV2 ?= $(if $(wildcard ../shared/data/real-zh-dev2/transcripts.csv),$(abspath ../shared/data/real-zh-dev2))

demo: setup ## the built-in demo: Mandarin demo data → fine-tune whisper-base (forgetting guard with ASRFT_REAL_ZH_DEV2=DIR) → report (runs/demo/)
	HF_HUB_OFFLINE=1 $(if $(ASRFT_REAL_ZH_DEV),ASRFT_REAL_ZH_DEV="$(ASRFT_REAL_ZH_DEV)") \
	  $(if $(ASRFT_REAL_ZH_DEV2),ASRFT_REAL_ZH_DEV2="$(ASRFT_REAL_ZH_DEV2)") $(BIN)/asr-ft run

lint: setup ## ruff
	$(BIN)/ruff check common jobs tests bench

clean-demo: ## delete the demo's data and run folder
	rm -rf demo_data runs/demo

.PHONY: image
image: ## build the CPU image with podman (IMAGE=…, BASE_IMAGE=…, TORCH_SPEC=…; see images/README.md)
	PYTHON=$(BIN)/python scripts/e2e-containers.sh build

e2e-containers: setup ## podman: build the CPU image on a local Debian base, run a tiny pipeline in containers
	PYTHON=$(BIN)/python scripts/e2e-containers.sh
