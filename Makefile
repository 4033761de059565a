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
# `make finetune-report CANDIDATE=...`, `make feedback-key NAME=...`
CANDIDATE  ?= artifacts/finetune/model.pt
NAME       ?= client
# `make soak DURATION=10`: minutes of load, warm-up included.
DURATION   ?= 30
# Debian packages the slow tests and benchmarks use (wrk: bench-serve; chromium: the page's browser
# test; iproute2: `ip netns` for the two-node torchrun test; dataset-fashion-mnist: the "not a digit"
# test set of training/tools/ood_data.py; prometheus: `make monitor` and its test; the fonts-* packages:
# the printed-digit set of training/tools/fonts.py, `make eval-fonts`; postgresql: the feedback store's
# PostgreSQL test starts its own throwaway cluster; buildah and debootstrap: the KServe predictor image
# the slow suite builds and serves from, `make kserve-image`); `make system-deps` installs the missing ones.
APT_PACKAGES ?= wrk chromium iproute2 dataset-fashion-mnist prometheus fonts-dejavu-core fonts-liberation2 \
                fonts-freefont-ttf fonts-sil-andika fonts-comic-neue postgresql buildah debootstrap
export INFERENCE_ADDRESS ?= 127.0.0.1:8080
export MANAGEMENT_ADDRESS ?= 127.0.0.1:8081
export METRICS_ADDRESS ?= 127.0.0.1:8082

.PHONY: help setup lock system-deps data train train-ddp tune train-ensemble tensorboard report-models evaluate \
        eval-wild eval-fonts calibrate trust-eval explain explain-eval latency keygen archive serve predict status token ui stop \
        demo kserve-bundle kserve-image kserve-serve deploy promote rollback versions undeploy compare monitor \
        rollout-check feedback-api feedback-key finetune finetune-report bench-feedback test test-isa test-fast lint \
        int8-parity bench bench-train bench-serve bench-kserve gpu-check chaos soak export distill bench-compress bench-hybrid edge-install \
        docker-build docker-run docker-train docker-archive docker-test docs docs-serve audit clean

help: ## @dev list the targets, by section
	@echo "usage: make TARGET [VAR=value ...] [ARGS=\"...\"]   (every target runs \`python -m ...\`; see README)"
	@awk -F':.*## @' '/^[a-z0-9-]+:.*## @/ { split($$2, w, " "); sec = w[1]; text = substr($$2, length(sec) + 2); \
	  body[sec] = body[sec] sprintf("  \033[1m%-15s\033[0m %s\n", $$1, text) } \
	  END { n = split("quick:Quick start|train:Train|serve:Package & serve|lifecycle:Lifecycle|trust:Trust|edge:Edge|scale:Scale out|bench:Benchmarks|dev:Dev", order, "|"); \
	  for (i = 1; i <= n; i++) { split(order[i], kv, ":"); if (kv[1] in body) printf "\n%s\n%s", kv[2], body[kv[1]] } }' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml requirements.lock requirements-dev.lock
	@$(PYTHON_SYS) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10+ is required, found " + sys.version.split()[0])'
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --require-hashes -r requirements-dev.lock
	@# setuptools' notice that an editable install of a flat layout sees same-named folders: expected here.
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --disable-pip-version-check -q --no-deps \
	    --no-build-isolation -e .
	@touch $@

setup: $(STAMP) ## @quick create .venv with the locked versions (requirements-dev.lock) and the project (idempotent)

# pip-compile resolves pyproject.toml's ranges to exact versions with hashes. torch and torchvision are
# pinned to the build the project runs (configs/lock-pins.in); the dev lock is constrained by the
# runtime one, so the venv and the image (which installs requirements.lock) run the same versions.
PIP_COMPILE = $(VENV)/bin/pip-compile --quiet --strip-extras --generate-hashes --allow-unsafe --no-emit-index-url \
              --no-emit-find-links
lock: $(STAMP) ## @dev re-resolve requirements.lock and requirements-dev.lock from pyproject.toml (several minutes)
	$(PIP_COMPILE) -o requirements.lock pyproject.toml configs/lock-pins.in
	$(PIP_COMPILE) --extra dev -c requirements.lock -o requirements-dev.lock pyproject.toml configs/lock-pins.in
	@# pip-compile drops markers: put back torch's own (its CUDA wheels and triton are required on Linux only).
	sed -i -E 's/^((nvidia-[a-z0-9-]+|cuda-[a-z-]+|triton)==[^ ]+) \\$$/\1 ; platform_system == "Linux" \\/' \
	    requirements.lock requirements-dev.lock

system-deps: ## @dev install the Debian packages the slow tests use (APT_PACKAGES; needs root or sudo)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	 if [ -z "$$missing" ]; then echo "system packages present: $(APT_PACKAGES)"; exit 0; fi; \
	 sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	 echo "+ $$sudo apt-get install" $$missing; \
	 $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing

data: $(STAMP) ## @quick download and verify MNIST into data/ (or the MNIST_DIR env variable)
	$(PY) -m training.data

train: $(STAMP) ## @train train the CNN (CUDA if present): artifacts/model.pt, metrics.json, plots
	$(PY) -m training.train --config $(CONFIG) $(ARGS)

train-ddp: $(STAMP) ## @scale train with torchrun on NPROC processes (nccl: one GPU each; ARGS="--device cpu": gloo on CPU)
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) -m training.train --config $(CONFIG) $(ARGS)

tune: $(STAMP) ## @train Optuna search (TRIALS=20) on validation accuracy → configs/tuned.yaml, plots in artifacts/tune/
	$(PY) -m training.recipes.tune --trials $(TRIALS) --config $(CONFIG) $(TUNE_ARGS) $(ARGS)

train-ensemble: $(STAMP) ## @train train N=5 members (seeds 0..N-1; CONFIG=configs/ensemble-deep.yaml: deeper members; ARGS="--config B": members alternate between CONFIG and B; ARGS=--jobs N: at once) → artifacts/ensemble/ensemble.pt
	$(PY) -m training.recipes.ensemble_train --members $(N) --config $(CONFIG) $(ARGS)

tensorboard: $(STAMP) ## @train TensorBoard on 127.0.0.1:6006 over every run under artifacts/ (training, trials, members)
	$(VENV)/bin/tensorboard --logdir artifacts --host 127.0.0.1 --port 6006

report-models: $(STAMP) ## @bench test accuracy ± std, training time and served speed: default, tuned, ensembles (slow)
	$(PY) -m bench.models $(ARGS)

evaluate: $(STAMP) ## @train re-score a checkpoint on the MNIST test set (CHECKPOINT=...)
	$(PY) -m training.tools.evaluate --checkpoint $(CHECKPOINT) $(ARGS)

eval-wild: $(STAMP) ## @trust score CHECKPOINT on the wild MNIST test set through the handler's decoding (~10 min)
	$(PY) -m bench.eval_wild --checkpoint $(CHECKPOINT) $(ARGS)

eval-fonts: $(STAMP) ## @trust score CHECKPOINT on 0-9 printed in 18 Debian font faces, through the handler's decoding
	$(PY) -m bench.eval_fonts --checkpoint $(CHECKPOINT) $(ARGS)

calibrate: $(STAMP) ## @trust fit temperature + "not a digit" threshold into an existing CHECKPOINT (train does it too)
	$(PY) -m training.tools.trust --checkpoint $(CHECKPOINT) $(ARGS)

trust-eval: $(STAMP) ## @trust "not a digit" table: AUROC vs Fashion-MNIST, noise, texture, text for every OOD score
	$(PY) -m training.tools.trust --checkpoint $(CHECKPOINT) --eval $(ARGS)

explain: $(STAMP) ## @trust write IMAGE.explain.png: the 28×28 input, its Integrated Gradients map and an overlay
	$(PY) -m training.tools.explain --checkpoint $(CHECKPOINT) --image $(IMAGE) $(ARGS)

latency: $(STAMP) ## @bench one request at a time: /predictions vs /explanations on a fresh server (~2 min)
	$(PY) -m bench.latency --checkpoint $(CHECKPOINT) $(ARGS)

explain-eval: $(STAMP) ## @trust deletion test of the explanations on 1,000 test digits (artifacts/deletion_curves.png)
	$(PY) -m training.tools.explain --checkpoint $(CHECKPOINT) --eval $(ARGS)

keygen: $(STAMP) ## @serve create the archive signing key in ~/.config/mnist-serve (ARGS=--rotate replaces it)
	$(PY) -m serving.signing keygen $(ARGS)

archive: $(STAMP) ## @serve package and sign the checkpoint as model_store/mnist.mar (MODEL_NAME=, VERSION=, ARGS=--force)
	$(PY) -m serving.archive --checkpoint $(CHECKPOINT) --model-name $(MODEL_NAME) --version $(VERSION) $(ARGS)

serve: $(STAMP) ## @serve start TorchServe on 127.0.0.1 in the background (MODEL_API=on lets `make deploy` register)
	$(PY) -m serving.cli start --model-name $(MODEL_NAME) --auth $(AUTH) --model-api $(MODEL_API) $(ARGS)

deploy: $(STAMP) ## @lifecycle register the signed archive of VERSION from model_store beside the default version
	$(PY) -m serving.lifecycle --model-name $(MODEL_NAME) deploy $(VERSION)

promote: $(STAMP) ## @lifecycle make the registered VERSION the default, also after a restart (`make rollback` undoes it)
	$(PY) -m serving.lifecycle --model-name $(MODEL_NAME) promote $(VERSION)

rollback: $(STAMP) ## @lifecycle make the version before the last promote the default again, also after a restart
	$(PY) -m serving.lifecycle --model-name $(MODEL_NAME) rollback

versions: $(STAMP) ## @lifecycle registered versions: default, answers, low-confidence share, batch time, signer
	$(PY) -m serving.lifecycle --model-name $(MODEL_NAME) versions

undeploy: $(STAMP) ## @lifecycle unregister VERSION (not the default)
	$(PY) -m serving.lifecycle --model-name $(MODEL_NAME) undeploy $(VERSION)

compare: $(STAMP) ## @lifecycle versions A= and B= on the MNIST test set over HTTP (LIMIT=): accuracy, agreement
	$(PY) -m serving.compare $(A) $(B) --model-name $(MODEL_NAME) $(if $(LIMIT),--limit $(LIMIT)) $(ARGS)

monitor: $(STAMP) ## @lifecycle Prometheus on 127.0.0.1:9090 scraping the running server, configs/alerts.yml (Ctrl-C stops)
	$(PY) -m serving.monitor $(ARGS)

feedback-api: $(STAMP) ## @lifecycle the feedback API for programs on 127.0.0.1:8093 (a feedback key; MNIST_FEEDBACK_DB= for PostgreSQL)
	$(PY) -m serving.feedback.api $(ARGS)

feedback-key: $(STAMP) ## @lifecycle create the feedback key NAME= (0600, in ~/.config/mnist-serve/feedback.keys) and print it
	$(PY) -m serving.feedback.api --add-key $(NAME)

finetune: $(STAMP) ## @lifecycle fine-tune CHECKPOINT on the stored corrections + MNIST replay → artifacts/finetune/model.pt (ARGS=--freeze-convs, --epochs, --replay-ratio)
	$(PY) -m training.recipes.finetune --base $(CHECKPOINT) $(ARGS)

finetune-report: $(STAMP) ## @lifecycle base CHECKPOINT vs CANDIDATE on MNIST and held-out feedback; exits non-zero unless GO
	$(PY) -m training.recipes.finetune_report --base $(CHECKPOINT) --candidate $(CANDIDATE) $(ARGS)

rollout-check: $(STAMP) ## @lifecycle deploy, promote, roll back under c=32 load on its own server: errors, p99 per step
	$(PY) -m bench.rollout --checkpoint $(CHECKPOINT) $(ARGS)

kserve-bundle: $(STAMP) ## @scale verify the signed archive and lay out artifacts/kserve/ (config + model-store) for KServe
	$(PY) -m serving.kserve --model-store model_store --model-name $(MODEL_NAME) --out artifacts/kserve $(ARGS)

kserve-serve: $(STAMP) ## @scale serve model_store/mnist.mar with the KServe predictor: v2 REST on 127.0.0.1:8090, gRPC on :8091
	$(PY) -m serving.predictor --archive model_store/$(MODEL_NAME).mar --http_port 8090 --grpc_port 8091 $(ARGS)

kserve-image: ## @scale build the KServe predictor image (buildah or docker; the project's CPU image first, cached)
	docker/kserve.sh

predict: $(STAMP) ## @serve send IMAGE=path to the running server and print the prediction
	$(PY) -m serving.cli predict $(IMAGE) --model-name $(MODEL_NAME)

status: $(STAMP) ## @serve show the server's models and workers
	$(PY) -m serving.cli status --model-name $(MODEL_NAME)

token: $(STAMP) ## @serve print the inference token of the running server (for curl)
	@$(PY) -m serving.cli token inference --model-name $(MODEL_NAME)

ui: $(STAMP) ## @serve the digit page on 127.0.0.1, a free port (printed); starts TorchServe first if it is not running
	@$(PY) -m serving.cli status --model-name $(MODEL_NAME) >/dev/null 2>&1 || $(MAKE) --no-print-directory serve
	$(PY) -m serving.ui --model-name $(MODEL_NAME) start

stop: $(STAMP) ## @serve stop the page and TorchServe (leaves nothing running)
	$(PY) -m serving.ui stop
	$(PY) -m serving.cli stop --model-name $(MODEL_NAME)

demo: $(STAMP) ## @quick the whole path: data → train → archive → serve → curl → stop
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

export: $(STAMP) ## @edge export CHECKPOINT to artifacts/export/: ONNX, torch.export, AOTInductor, int8 (+ parity lines)
	$(PY) -m training.tools.export --checkpoint $(CHECKPOINT) $(ARGS)

distill: $(STAMP) ## @train train a 5x smaller student from CHECKPOINT (SEEDS=3, with and without the teacher); export it
	$(PY) -m training.recipes.distill --teacher $(CHECKPOINT) --seeds $(SEEDS) $(ARGS)
	$(PY) -m training.tools.export --checkpoint artifacts/student.pt --out artifacts/export/student --formats onnx

# ISA=avx2: run as the lowest x86 CPU the project supports would (PyTorch and oneDNN capped to AVX2).
ISA        ?=
ISA_CAP     = $(if $(filter avx2,$(ISA)),$(AVX2_CAP))
int8-parity: $(STAMP) ## @edge int8 vs fp32 answers on the 10k test digits on this CPU (ISA=avx2: capped; ARGS=--aoti)
	$(ISA_CAP) $(PY) -m bench.int8_parity --checkpoint $(CHECKPOINT) $(ARGS)

bench-compress: $(STAMP) ## @edge the compression table: size, accuracy, 1-thread latency/throughput, memory per format
	$(PY) -m bench.compress $(ARGS)

bench-hybrid: $(STAMP) ## @edge edge first, server when unsure (calibrated): MNIST test + wild sets, live TorchServe
	$(PY) -m bench.hybrid --checkpoint $(CHECKPOINT) $(ARGS)

edge-install: ## @edge install the torch-free edge client (edge/) into the active Python: `mnist-edge predict IMAGE`
	$(PYTHON_SYS) -m pip install ./edge

test: $(STAMP) ## @dev the whole test suite, slow ones included (training, torchrun, a real TorchServe)
	$(PY) -m pytest $(ARGS)

# The tests whose answers depend on the CPU's kernels (variants, export, precision, train/serve parity,
# preprocessing, DDP), run as an AVX2-only CPU would: PyTorch, oneDNN, NumPy and OpenCV capped. ONNX
# Runtime has no cap: its int8 file is exact on every x86 CPU by construction (training/tools/export.py).
AVX2_CAP  := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 OPENCV_CPU_DISABLE=AVX512_SKX \
             NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR"
ISA_TESTS ?= tests/test_export.py tests/test_precision.py tests/test_handler.py tests/test_tensors.py \
             tests/test_model.py tests/test_ensemble.py tests/test_preprocess.py tests/test_decode.py \
             tests/test_wild.py tests/test_trust.py tests/test_train.py \
             tests/test_ddp.py::test_two_ranks_train_exactly_like_one_process_and_only_rank0_writes
test-isa: $(STAMP) ## @dev the CPU-sensitive tests again, capped to AVX2 (no AVX-512, VNNI or bf16): ~8 min
	$(AVX2_CAP) $(PY) -m pytest $(ISA_TESTS) $(ARGS)

test-fast: $(STAMP) ## @dev unit tests only: no training, no server, no Java, no download (MNIST tests skip without data)
	MNIST_OFFLINE=1 $(PY) -m pytest -m "not slow" $(ARGS)

lint: $(STAMP) ## @dev ruff, mypy, promtool over the Prometheus config and rules, the docs site built --strict
	$(VENV)/bin/ruff check training serving tests bench deploy edge docs
	$(VENV)/bin/mypy training serving bench
	promtool check config configs/prometheus.yml
	promtool check rules configs/alerts.yml
	$(PY) docs/render.py --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -f docs/mkdocs.yml

# PyPI is the only vulnerability data these machines reach, and it answers only for some pins; the jar is
# checked against a table in the code. What is and is not checked: docs/pages/serving.md#dependencies-and-accepted-risks.
audit: $(STAMP) ## @dev known vulnerabilities: locked packages (PyPI), TorchServe's jar; configs/accepted-risks.yaml
	$(PY) -m bench.audit $(ARGS)

# The site: docs/pages/ (docs/mkdocs.yml), its result tables rendered from results/ by docs/render.py.
DOCS_PORT ?= 8000
docs: $(STAMP) ## @dev render the result tables from results/ into README and docs/, build the site into docs/_site/
	$(PY) docs/render.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -f docs/mkdocs.yml

docs-serve: $(STAMP) ## @dev serve the docs site on 127.0.0.1:DOCS_PORT (8000), rebuilt on every change
	$(PY) docs/render.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve -f docs/mkdocs.yml --dev-addr 127.0.0.1:$(DOCS_PORT)

bench: bench-train bench-serve ## @bench both benchmarks, each writing a record under results/

bench-train: $(STAMP) ## @bench training time-to-accuracy over seeds (SEEDS=3) in plain-recipe epochs (bench/plain.py); ISA=avx2: capped
	$(ISA_CAP) $(PY) -m bench.train --seeds $(SEEDS) $(ARGS)

bench-serve: $(STAMP) ## @bench serving: this project vs TorchServe's MNIST example and vs in-process, wrk at c=1,8,64,256
	$(PY) -m bench.serve --checkpoint $(CHECKPOINT) $(ARGS)

bench-feedback: $(STAMP) ## @bench fine-tuning on 50/200/1000 corrections in a user's style: accuracy before/after, MNIST after
	$(PY) -m bench.feedback $(ARGS)

bench-kserve: $(STAMP) ## @bench the KServe predictor vs TorchServe on one archive, v2 requests, wrk at c=1 and 64
	$(PY) -m bench.kserve --checkpoint $(CHECKPOINT) $(ARGS)

gpu-check: $(STAMP) ## @bench everything that needs CUDA, one table in <= 8 min (CUDA training, nccl DDP, serving on cuda:0)
	$(PY) -m bench.gpu_check $(ARGS)

chaos: $(STAMP) ## @bench faults on a live server: bad input, kill a worker, SIGTERM, 5-min soak (~9 min)
	$(PY) -m bench.chaos --checkpoint $(CHECKPOINT) $(ARGS)

soak: $(STAMP) ## @bench DURATION min (30) at c=32, digits + worst-case images, kill -9 / promote / rollback in turn
	$(PY) -m bench.soak --checkpoint $(CHECKPOINT) --minutes $(DURATION) $(ARGS)

docker-build: ## @scale build the image (docker, or buildah where no Docker engine runs)
	docker/build.sh

docker-run: ## @scale serve from the image on 127.0.0.1, trusting your public keys (mounted read-only; --gpus with NVIDIA)
	docker/run.sh serve

docker-train: ## @scale train inside the image, artifacts/ mounted
	docker/run.sh train $(ARGS)

docker-archive: ## @scale archive artifacts/model.pt inside the image, signed with your key dir (mounted, mode 0700)
	docker/run.sh archive $(ARGS)

docker-test: $(STAMP) ## @scale lint, build and run the image for real (slow: docs/pages/docker.md)
	docker/test.sh

clean: ## @dev remove logs and caches (keeps data/, artifacts/ and model_store/; refused while `make serve` runs)
	@# logs/ holds the running server's pid and key files: without them `make stop` could not find it.
	@for f in logs/tmp/.model_server.pid logs/ui.pid; do \
		pid=$$(cat $$f 2>/dev/null) && ps -p "$$pid" -o args= 2>/dev/null | grep -q 'ModelServer\|serving.ui' && \
		{ echo "error: TorchServe or the page is running from logs/ (pid $$pid): \`make stop\` first" >&2; exit 1; }; \
	done; true
	rm -rf logs .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
