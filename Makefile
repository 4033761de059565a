# The front door. Every target is a thin wrapper over `python -m ...`; `make help` lists them.
# Every target depends on the virtualenv, so a fresh clone needs no manual setup step.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.setup-stamp

# Overridable from the command line: `make train ARGS="--epochs 3"`, `make archive VERSION=2`.
ARGS       ?=
CONFIG     ?= configs/train.yaml
CHECKPOINT ?= artifacts/model.pt
MODEL_NAME ?= mnist
VERSION    ?= 1.0
IMAGE      ?= serving/samples/7.png
NPROC      ?= 2
SEEDS      ?= 3
TRIALS     ?= 20
N          ?= 5
# `make tune` trains each trial on a slice for a few epochs: the budget of one trial.
TUNE_ARGS  ?= --epochs 3 --train-limit 20000
AUTH       ?= on
# Debian packages the slow tests and benchmarks use; `make system-deps` installs the missing ones.
APT_PACKAGES ?= wrk
export INFERENCE_ADDRESS ?= 127.0.0.1:8080
export MANAGEMENT_ADDRESS ?= 127.0.0.1:8081
export METRICS_ADDRESS ?= 127.0.0.1:8082

.PHONY: help setup system-deps data train train-ddp tune train-ensemble tensorboard report-models evaluate archive serve predict status token stop demo \
        test test-fast lint bench bench-train bench-serve chaos docker-build docker-run docker-train docker-test clean

help: ## list the targets
	@echo "usage: make TARGET [ARGS=...]"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-13s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON_SYS) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10+ is required, found " + sys.version.split()[0])'
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --upgrade pip
	$(PY) -m pip install --disable-pip-version-check -e '.[dev]'
	@touch $@

setup: $(STAMP) ## create .venv and install the project with its dev tools (idempotent)

system-deps: ## install the Debian packages the slow tests use (APT_PACKAGES; needs root or sudo)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	 if [ -z "$$missing" ]; then echo "system packages present: $(APT_PACKAGES)"; exit 0; fi; \
	 sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	 echo "+ $$sudo apt-get install" $$missing; \
	 $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing

data: $(STAMP) ## download and verify MNIST into data/ (or the MNIST_DIR env variable)
	$(PY) -m training.data

train: $(STAMP) ## train the CNN (CUDA if present): artifacts/model.pt, metrics.json, plots
	$(PY) -m training.train --config $(CONFIG) $(ARGS)

train-ddp: $(STAMP) ## train with torchrun on NPROC processes (DDP: gloo on CPU, nccl on GPUs)
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) -m training.train --config $(CONFIG) $(ARGS)

tune: $(STAMP) ## Optuna search (TRIALS=20) on validation accuracy → configs/tuned.yaml, plots in artifacts/tune/
	$(PY) -m training.tune --trials $(TRIALS) --config $(CONFIG) $(TUNE_ARGS) $(ARGS)

train-ensemble: $(STAMP) ## train N=5 members (seeds 0..N-1) → artifacts/ensemble/ensemble.pt (archive: ARGS=--ensemble)
	$(PY) -m training.ensemble_train --members $(N) --config $(CONFIG) $(ARGS)

tensorboard: $(STAMP) ## TensorBoard on 127.0.0.1:6006 over every run under artifacts/ (training, trials, members)
	$(VENV)/bin/tensorboard --logdir artifacts --host 127.0.0.1 --port 6006

report-models: $(STAMP) ## test accuracy ± std, training time and served speed: default, tuned, ensembles (slow)
	$(PY) -m bench.models $(ARGS)

evaluate: $(STAMP) ## re-score a checkpoint on the MNIST test set (CHECKPOINT=...)
	$(PY) -m training.evaluate --checkpoint $(CHECKPOINT) $(ARGS)

archive: $(STAMP) ## package the checkpoint as model_store/mnist.mar (MODEL_NAME=, VERSION=, ARGS=--force)
	$(PY) -m serving.archive --checkpoint $(CHECKPOINT) --model-name $(MODEL_NAME) --version $(VERSION) $(ARGS)

serve: $(STAMP) ## start TorchServe on 127.0.0.1 in the background; returns when workers are READY
	$(PY) -m serving.cli start --model-name $(MODEL_NAME) --auth $(AUTH) $(ARGS)

predict: $(STAMP) ## send IMAGE=path to the running server and print the prediction
	$(PY) -m serving.cli predict $(IMAGE) --model-name $(MODEL_NAME)

status: $(STAMP) ## show the server's models and workers
	$(PY) -m serving.cli status --model-name $(MODEL_NAME)

token: $(STAMP) ## print the inference token of the running server (for curl)
	@$(PY) -m serving.cli token inference --model-name $(MODEL_NAME)

stop: $(STAMP) ## stop TorchServe (leaves nothing running)
	$(PY) -m serving.cli stop --model-name $(MODEL_NAME)

demo: $(STAMP) ## the whole path: data → train → archive → serve → curl → stop
	$(MAKE) --no-print-directory data
	@if [ -f $(CHECKPOINT) ]; then echo "using the existing $(CHECKPOINT) (delete it to retrain)"; \
	 else $(MAKE) --no-print-directory train; fi
	@if [ -f model_store/$(MODEL_NAME).mar ]; then echo "using the existing model_store/$(MODEL_NAME).mar"; \
	 else $(MAKE) --no-print-directory archive; fi
	$(MAKE) --no-print-directory serve
	@trap '$(MAKE) --no-print-directory stop' EXIT; \
	 echo "+ curl -H 'Authorization: Bearer <inference key>' -H 'Content-Type: application/octet-stream' --data-binary @$(IMAGE) http://$(INFERENCE_ADDRESS)/predictions/$(MODEL_NAME)"; \
	 curl -sS --fail-with-body -H "Authorization: Bearer $$($(PY) -m serving.cli token inference)" \
	      -H "Content-Type: application/octet-stream" --data-binary @$(IMAGE) \
	      http://$(INFERENCE_ADDRESS)/predictions/$(MODEL_NAME); echo

test: $(STAMP) ## the whole test suite, slow ones included (training, torchrun, a real TorchServe)
	$(PY) -m pytest $(ARGS)

test-fast: $(STAMP) ## unit tests only (no training, no server)
	$(PY) -m pytest -m "not slow" $(ARGS)

lint: $(STAMP) ## ruff over the code
	$(VENV)/bin/ruff check training serving tests

bench: bench-train bench-serve ## both benchmarks (tables in README; ~8 min on 2 cores)

bench-train: $(STAMP) ## training time-to-accuracy over seeds (SEEDS=3)
	$(PY) -m bench.train --seeds $(SEEDS)

bench-serve: $(STAMP) ## serving: this project vs TorchServe's MNIST example, wrk at c=1,8,64,256
	$(PY) -m bench.serve --checkpoint $(CHECKPOINT) $(ARGS)

chaos: $(STAMP) ## faults on a live server: bad input, kill a worker, SIGTERM, 5-min soak (~9 min)
	$(PY) -m bench.chaos --checkpoint $(CHECKPOINT) $(ARGS)

docker-build: ## build the image (docker, or buildah where no Docker engine runs)
	docker/build.sh

docker-run: ## serve from the image on 127.0.0.1 (adds --gpus all when the NVIDIA runtime is present)
	docker/run.sh serve

docker-train: ## train inside the image, artifacts/ mounted
	docker/run.sh train

docker-test: $(STAMP) ## lint, build and run the image for real (slow: see README)
	docker/test.sh

clean: ## remove logs and caches (keeps data/, artifacts/ and model_store/)
	rm -rf logs .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
