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
MODEL_API  ?= off
# `make compare A=1.0 B=2.0 LIMIT=1000`: two registered versions on the MNIST test set.
A          ?= 1.0
B          ?= 2.0
LIMIT      ?=
# Debian packages the slow tests and benchmarks use (wrk: bench-serve; chromium: the page's browser
# test; iproute2: `ip netns` for the two-node torchrun test; dataset-fashion-mnist: the "not a digit"
# test set of training/ood_data.py; prometheus: `make monitor` and its test; the fonts-* packages:
# the printed-digit set of training/fonts.py, `make eval-fonts`); `make system-deps` installs the missing ones.
APT_PACKAGES ?= wrk chromium iproute2 dataset-fashion-mnist prometheus fonts-dejavu-core fonts-liberation2 \
                fonts-freefont-ttf fonts-sil-andika fonts-comic-neue
export INFERENCE_ADDRESS ?= 127.0.0.1:8080
export MANAGEMENT_ADDRESS ?= 127.0.0.1:8081
export METRICS_ADDRESS ?= 127.0.0.1:8082

.PHONY: help setup lock system-deps data train train-ddp tune train-ensemble tensorboard report-models evaluate \
        eval-wild eval-fonts calibrate trust-eval explain explain-eval latency keygen archive serve predict status token ui stop \
        demo kserve-bundle deploy promote rollback versions undeploy compare monitor rollout-check test test-fast lint \
        bench bench-train bench-serve gpu-check chaos export distill bench-compress bench-hybrid edge-install \
        docker-build docker-run docker-train docker-archive docker-test clean

help: ## list the targets
	@echo "usage: make TARGET [ARGS=...]"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-15s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock requirements-dev.lock
	@$(PYTHON_SYS) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10+ is required, found " + sys.version.split()[0])'
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --require-hashes -r requirements-dev.lock
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@touch $@

setup: $(STAMP) ## create .venv with the locked versions (requirements-dev.lock) and the project (idempotent)

# pip-compile resolves pyproject.toml's ranges to exact versions with hashes. torch and torchvision are
# pinned to the build the project runs (configs/lock-pins.in); the dev lock is constrained by the
# runtime one, so the venv and the image (which installs requirements.lock) run the same versions.
PIP_COMPILE = $(VENV)/bin/pip-compile --quiet --strip-extras --generate-hashes --allow-unsafe --no-emit-index-url \
              --no-emit-find-links
lock: $(STAMP) ## re-resolve requirements.lock and requirements-dev.lock from pyproject.toml (several minutes)
	$(PIP_COMPILE) -o requirements.lock pyproject.toml configs/lock-pins.in
	$(PIP_COMPILE) --extra dev -c requirements.lock -o requirements-dev.lock pyproject.toml configs/lock-pins.in

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

train-ddp: $(STAMP) ## train with torchrun on NPROC processes (nccl: one GPU each; ARGS="--device cpu": gloo on CPU)
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) -m training.train --config $(CONFIG) $(ARGS)

tune: $(STAMP) ## Optuna search (TRIALS=20) on validation accuracy → configs/tuned.yaml, plots in artifacts/tune/
	$(PY) -m training.tune --trials $(TRIALS) --config $(CONFIG) $(TUNE_ARGS) $(ARGS)

train-ensemble: $(STAMP) ## train N=5 members (seeds 0..N-1; CONFIG=configs/ensemble-deep.yaml: deeper members; ARGS="--config B": members alternate between CONFIG and B; ARGS=--jobs N: at once) → artifacts/ensemble/ensemble.pt
	$(PY) -m training.ensemble_train --members $(N) --config $(CONFIG) $(ARGS)

tensorboard: $(STAMP) ## TensorBoard on 127.0.0.1:6006 over every run under artifacts/ (training, trials, members)
	$(VENV)/bin/tensorboard --logdir artifacts --host 127.0.0.1 --port 6006

report-models: $(STAMP) ## test accuracy ± std, training time and served speed: default, tuned, ensembles (slow)
	$(PY) -m bench.models $(ARGS)

evaluate: $(STAMP) ## re-score a checkpoint on the MNIST test set (CHECKPOINT=...)
	$(PY) -m training.evaluate --checkpoint $(CHECKPOINT) $(ARGS)

eval-wild: $(STAMP) ## score CHECKPOINT on the wild MNIST test set through the handler's decoding (~10 min)
	$(PY) -m bench.eval_wild --checkpoint $(CHECKPOINT) $(ARGS)

eval-fonts: $(STAMP) ## score CHECKPOINT on 0-9 printed in 18 Debian font faces, through the handler's decoding (~10 s)
	$(PY) -m bench.eval_fonts --checkpoint $(CHECKPOINT) $(ARGS)

calibrate: $(STAMP) ## fit temperature + "not a digit" threshold into an existing CHECKPOINT (train does it too)
	$(PY) -m training.trust --checkpoint $(CHECKPOINT) $(ARGS)

trust-eval: $(STAMP) ## "not a digit" table: AUROC vs Fashion-MNIST, noise, texture, text for every OOD score
	$(PY) -m training.trust --checkpoint $(CHECKPOINT) --eval $(ARGS)

explain: $(STAMP) ## write IMAGE.explain.png: the 28×28 input, its Integrated Gradients map and an overlay
	$(PY) -m training.explain --checkpoint $(CHECKPOINT) --image $(IMAGE) $(ARGS)

latency: $(STAMP) ## one request at a time: /predictions vs /explanations on a fresh server (~2 min)
	$(PY) -m bench.latency --checkpoint $(CHECKPOINT) $(ARGS)

explain-eval: $(STAMP) ## deletion test of the explanations on 1,000 test digits (artifacts/deletion_curves.png)
	$(PY) -m training.explain --checkpoint $(CHECKPOINT) --eval $(ARGS)

keygen: $(STAMP) ## create the archive signing key in ~/.config/mnist-serve (ARGS=--rotate replaces it)
	$(PY) -m serving.signing keygen $(ARGS)

archive: $(STAMP) ## package and sign the checkpoint as model_store/mnist.mar (MODEL_NAME=, VERSION=, ARGS=--force)
	$(PY) -m serving.archive --checkpoint $(CHECKPOINT) --model-name $(MODEL_NAME) --version $(VERSION) $(ARGS)

serve: $(STAMP) ## start TorchServe on 127.0.0.1 in the background (MODEL_API=on lets `make deploy` register)
	$(PY) -m serving.cli start --model-name $(MODEL_NAME) --auth $(AUTH) --model-api $(MODEL_API) $(ARGS)

deploy: $(STAMP) ## register the signed archive of VERSION from model_store beside the default version
	$(PY) -m serving.lifecycle --model-name $(MODEL_NAME) deploy $(VERSION)

promote: $(STAMP) ## make the registered VERSION the default, also after a restart (`make rollback` undoes it)
	$(PY) -m serving.lifecycle --model-name $(MODEL_NAME) promote $(VERSION)

rollback: $(STAMP) ## make the version before the last promote the default again, also after a restart
	$(PY) -m serving.lifecycle --model-name $(MODEL_NAME) rollback

versions: $(STAMP) ## registered versions: default, answers, low-confidence share, batch time, signer
	$(PY) -m serving.lifecycle --model-name $(MODEL_NAME) versions

undeploy: $(STAMP) ## unregister VERSION (not the default)
	$(PY) -m serving.lifecycle --model-name $(MODEL_NAME) undeploy $(VERSION)

compare: $(STAMP) ## versions A= and B= on the MNIST test set over HTTP (LIMIT=): accuracy, agreement
	$(PY) -m serving.compare $(A) $(B) --model-name $(MODEL_NAME) $(if $(LIMIT),--limit $(LIMIT)) $(ARGS)

monitor: $(STAMP) ## Prometheus on 127.0.0.1:9090 scraping the running server, configs/alerts.yml (Ctrl-C stops)
	$(PY) -m serving.monitor $(ARGS)

rollout-check: $(STAMP) ## deploy, promote, roll back under c=32 load on its own server: errors, p99 per step
	$(PY) -m bench.rollout --checkpoint $(CHECKPOINT) $(ARGS)

kserve-bundle: $(STAMP) ## lay out artifacts/kserve/ (config + model-store) for KServe's TorchServe runtime
	$(PY) -m serving.kserve --model-store model_store --model-name $(MODEL_NAME) --out artifacts/kserve $(ARGS)

predict: $(STAMP) ## send IMAGE=path to the running server and print the prediction
	$(PY) -m serving.cli predict $(IMAGE) --model-name $(MODEL_NAME)

status: $(STAMP) ## show the server's models and workers
	$(PY) -m serving.cli status --model-name $(MODEL_NAME)

token: $(STAMP) ## print the inference token of the running server (for curl)
	@$(PY) -m serving.cli token inference --model-name $(MODEL_NAME)

ui: $(STAMP) ## the digit page on 127.0.0.1, a free port (printed); starts TorchServe first if it is not running
	@$(PY) -m serving.cli status --model-name $(MODEL_NAME) >/dev/null 2>&1 || $(MAKE) --no-print-directory serve
	$(PY) -m serving.ui --model-name $(MODEL_NAME) start

stop: $(STAMP) ## stop the page and TorchServe (leaves nothing running)
	$(PY) -m serving.ui stop
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

export: $(STAMP) ## export CHECKPOINT to artifacts/export/: ONNX, torch.export, AOTInductor, int8 (+ parity lines)
	$(PY) -m training.export --checkpoint $(CHECKPOINT) $(ARGS)

distill: $(STAMP) ## train a 5x smaller student from CHECKPOINT (SEEDS=3, with and without the teacher); export it
	$(PY) -m training.distill --teacher $(CHECKPOINT) --seeds $(SEEDS) $(ARGS)
	$(PY) -m training.export --checkpoint artifacts/student.pt --out artifacts/export/student --formats onnx

bench-compress: $(STAMP) ## the compression table: size, accuracy, 1-thread latency/throughput, memory per format
	$(PY) -m bench.compress $(ARGS)

bench-hybrid: $(STAMP) ## edge first, server when unsure (calibrated): MNIST test + wild sets, live TorchServe
	$(PY) -m bench.hybrid --checkpoint $(CHECKPOINT) $(ARGS)

edge-install: ## install the torch-free edge client (edge/) into the active Python: `mnist-edge predict IMAGE`
	$(PYTHON_SYS) -m pip install ./edge

test: $(STAMP) ## the whole test suite, slow ones included (training, torchrun, a real TorchServe)
	$(PY) -m pytest $(ARGS)

test-fast: $(STAMP) ## unit tests only: no training, no server, no Java, no download (MNIST tests skip without data)
	MNIST_OFFLINE=1 $(PY) -m pytest -m "not slow" $(ARGS)

lint: $(STAMP) ## ruff over the code, mypy over training/, serving/ and bench/, promtool over the Prometheus config and rules
	$(VENV)/bin/ruff check training serving tests bench deploy edge
	$(VENV)/bin/mypy training serving bench
	promtool check config configs/prometheus.yml
	promtool check rules configs/alerts.yml

bench: bench-train bench-serve ## both benchmarks (tables in README; ~8 min on 2 cores)

bench-train: $(STAMP) ## training time-to-accuracy over seeds (SEEDS=3), also in plain-recipe epochs (bench/plain.py)
	$(PY) -m bench.train --seeds $(SEEDS)

bench-serve: $(STAMP) ## serving: this project vs TorchServe's MNIST example and vs in-process, wrk at c=1,8,64,256
	$(PY) -m bench.serve --checkpoint $(CHECKPOINT) $(ARGS)

gpu-check: $(STAMP) ## everything that needs CUDA, one table in <= 8 min (CUDA training, nccl DDP, serving on cuda:0)
	$(PY) -m bench.gpu_check $(ARGS)

chaos: $(STAMP) ## faults on a live server: bad input, kill a worker, SIGTERM, 5-min soak (~9 min)
	$(PY) -m bench.chaos --checkpoint $(CHECKPOINT) $(ARGS)

docker-build: ## build the image (docker, or buildah where no Docker engine runs)
	docker/build.sh

docker-run: ## serve from the image on 127.0.0.1, trusting your public keys (mounted read-only; --gpus with NVIDIA)
	docker/run.sh serve

docker-train: ## train inside the image, artifacts/ mounted
	docker/run.sh train $(ARGS)

docker-archive: ## archive artifacts/model.pt inside the image, signed with your key dir (mounted, mode 0700)
	docker/run.sh archive $(ARGS)

docker-test: $(STAMP) ## lint, build and run the image for real (slow: see README)
	docker/test.sh

clean: ## remove logs and caches (keeps data/, artifacts/ and model_store/; refused while `make serve` runs)
	@# logs/ holds the running server's pid and key files: without them `make stop` could not find it.
	@for f in logs/tmp/.model_server.pid logs/ui.pid; do \
		pid=$$(cat $$f 2>/dev/null) && ps -p "$$pid" -o args= 2>/dev/null | grep -q 'ModelServer\|serving.ui' && \
		{ echo "error: TorchServe or the page is running from logs/ (pid $$pid): \`make stop\` first" >&2; exit 1; }; \
	done; true
	rm -rf logs .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
