# tapmask — two commands: `make serve` and `make test`. Each creates/refreshes .venv itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

# The model to serve: TAPMASK_MODEL (the setting every tapmask process reads), else grabcut.
MODEL ?= $(or $(TAPMASK_MODEL),grabcut)
HOST ?= 0.0.0.0
PORT ?= 9090
# The pip extra a model family needs: the GrabCut default needs none (no torch download).
# (The transformers-based names are tested first: they also start with "sam".)
HF_MODELS := sam2.1-% sam-hq-% sam-hf-% edgetam
SERVE_EXTRA := $(if $(filter $(HF_MODELS),$(MODEL)),hf,$(if $(filter sam sam-%,$(MODEL)),sam,$(if $(filter ritm%,$(MODEL)),ritm,)))

.PHONY: serve test lint format bench bench-gpu eval clean help deploy-cvat docker-build lint-docker lint-k8s
help:
	@echo "make serve   install the core (+ the MODEL's extra) and serve the Label Studio backend on $(HOST):$(PORT)"
	@echo "make test    install everything and run the tests"
	@echo "make lint    ruff check + format check, Dockerfiles, compose, Kubernetes manifests"
	@echo "make bench   side-by-side performance measurements"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -U pip

# One stamp per set of extras, refreshed whenever pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml | $(PY)
	$(PIP) install -e '.[$(subst +,$(comma),$*)]'
	touch $@

$(VENV)/.installed-core: pyproject.toml | $(PY)
	$(PIP) install -e .
	touch $@

comma := ,

# Label Studio itself, for the end-to-end tests only, in its own venv (its pins clash with ours).
LS_VENV ?= .venv-labelstudio
LS_VERSION ?= 1.23.2
$(LS_VENV)/.installed-$(LS_VERSION):
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip --disable-pip-version-check -q install 'label-studio==$(LS_VERSION)'
	touch $@

SERVE_STAMP := $(VENV)/.installed-$(if $(SERVE_EXTRA),$(SERVE_EXTRA),core)

serve: $(SERVE_STAMP)
	$(VENV)/bin/tapmask serve labelstudio --host $(HOST) --port $(PORT) --model $(MODEL)

test: $(VENV)/.installed-all+dev $(LS_VENV)/.installed-$(LS_VERSION)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-all+dev lint-docker lint-k8s
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed-all+dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(VENV)/.installed-all+dev
	$(VENV)/bin/tapmask bench

# One device's table: encode/click latency, memory, batched encodes, clicks through a worker.
DEVICE ?= cuda
bench-gpu: $(VENV)/.installed-all+dev
	$(VENV)/bin/tapmask bench-gpu --device $(DEVICE)

# CVAT: build and deploy the nuclio functions in serverless/ (needs nuctl and Docker).
# GPU=1 uses function-gpu.yaml; FUNCTIONS="sam ritm" picks some (default: all).
deploy-cvat:
	serverless/deploy.sh $(if $(GPU),--gpu) $(FUNCTIONS)

# CVAT: rewrite serverless/*/nuclio/ from the table in serverless/functions.py (a test fails when
# a committed file differs from it). `python -m serverless.generate --check` only lists them.
.PHONY: cvat-functions
cvat-functions: $(VENV)/.installed-dev
	$(PY) -m serverless.generate

# Docker: the images (serverless/*/nuclio/function*.yaml use them as baseImage), and their lint.
# The Dockerfiles need BuildKit (RUN --mount, COPY --chmod): the default builder since Docker 23.
TAPMASK_CPU_IMAGE ?= tapmask/tapmask-cpu:latest
TAPMASK_GPU_IMAGE ?= tapmask/tapmask-gpu:latest
DOCKER_BUILD_ARGS ?=
COMPOSE_CHECK := $(VENV)/bin/docker-compose

docker-build:
	DOCKER_BUILDKIT=1 docker build -f docker/Dockerfile -t $(TAPMASK_CPU_IMAGE) $(DOCKER_BUILD_ARGS) .
	DOCKER_BUILDKIT=1 docker build -f docker/Dockerfile.gpu -t $(TAPMASK_GPU_IMAGE) $(DOCKER_BUILD_ARGS) .

# Checks that need no Docker engine: hadolint, and the real Compose CLI resolving every file.
lint-docker: $(VENV)/.installed-all+dev
	$(VENV)/bin/hadolint docker/Dockerfile docker/Dockerfile.gpu
	$(COMPOSE_CHECK) -f docker/compose.yml config --quiet
	$(COMPOSE_CHECK) -f docker/compose.yml -f docker/compose.cpu.yml config --quiet
	$(COMPOSE_CHECK) -f docker/compose.yml --profile label-studio config --quiet

clean:
	rm -rf $(VENV) .pytest_cache eval-results

# Kubernetes: render every kustomization in deploy/kubernetes (no cluster, no kustomize binary)
# and validate each object offline: Kubernetes kinds against the schemas of kubernetes-validate
# (strict), KEDA ScaledObjects and the Prometheus Operator kinds against deploy/kubernetes/schemas/.
lint-k8s: $(VENV)/.installed-all+dev
	$(PY) -m deploy.check
