# The user's verbs. Every target creates the virtual environment on first use: torch first (TORCH, default the CPU
# build; TORCH_INDEX: a wheel index such as https://download.pytorch.org/whl/cu124 for a CUDA build), then the suite.
#   make install [EXTRAS=tfds]     the environment; EXTRAS: optional extras added to it (tfds: TensorFlow Datasets
#                                  and TensorFlow, ~1.5 GB, for task.source=tfds; tensorboard)
#   make demo                      train + test a real model on generated ListOps in minutes (CPU)
#   make test                      the default test suite (slow tests excluded)
#   make reproduce TASK=listops MODEL=proxyformer [PROTOCOL=nystrom] [SEED=0] [ARGS="..."]
#   make sweep TASKS=listops,text MODELS=transformer,proxyformer SEEDS=0,1,2 [PROTOCOL=..] [ARGS="..."]
#                                  one run per cell (Hydra multirun); re-running resumes; failures recorded
#   make tables                    results/accuracy.{md,csv} from the run records
#   make bench [PROFILE=quick|full|scaling] [ARGS="..."]  speed/memory grid -> results/efficiency.{md,csv}, plots
#   make fidelity [ARGS="--lengths 1024 2048"]   results/fidelity.{md,csv}: each approximation vs exact softmax
#   make data TASK=text [PROTOCOL=nystrom] [ARGS="..."]   download (release archive or hub copy) and prepare a
#                                  task's data, for the protocol make reproduce uses (PROTOCOL, default nystrom)
#   make data-status [PROTOCOL=..] what is present, prepared, missing, per task (for that protocol)
#   make data-listops              generate a full-size ListOps set offline (LRA algorithm)
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
TASK ?= listops
MODEL ?= proxyformer
PROTOCOL ?= nystrom
SEED ?= 0
TASKS ?= $(TASK)
MODELS ?= $(MODEL)
SEEDS ?= $(SEED)
PROFILE ?= quick
ARGS ?=
EXTRAS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow lint reproduce sweep tables bench fidelity data data-status data-listops clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[dev,plots,sweep,slurm]"
	touch $(STAMP)

install: $(STAMP)
ifneq ($(EXTRAS),)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
endif

demo: $(STAMP)
	$(BIN)/python -m lra.train task=$(TASK) model=$(MODEL) protocol=quick seed=$(SEED) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check lra tests

reproduce: $(STAMP)
	$(BIN)/python -m lra.train task=$(TASK) model=$(MODEL) protocol=$(PROTOCOL) seed=$(SEED) $(ARGS)

sweep: $(STAMP)
	$(BIN)/python -m lra.sweep --tasks $(TASKS) --models $(MODELS) --seeds $(SEEDS) --protocol $(PROTOCOL) $(ARGS)

tables: $(STAMP)
	$(BIN)/python -m lra.tables

bench: $(STAMP)
	$(BIN)/lra-bench --profile $(PROFILE) $(ARGS)

fidelity: $(STAMP)
	$(BIN)/python -m lra.fidelity $(ARGS)

data: $(STAMP)
	$(BIN)/lra-data download $(TASK) protocol=$(PROTOCOL) $(ARGS)
	$(BIN)/lra-data prepare $(TASK) protocol=$(PROTOCOL) $(ARGS)

data-status: $(STAMP)
	$(BIN)/lra-data status protocol=$(PROTOCOL) $(ARGS)

data-listops: $(STAMP)
	$(BIN)/python -m lra.data.cli generate listops

clean-venv:
	rm -rf $(VENV)
