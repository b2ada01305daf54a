# One entry point for humans and CI. Every target creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: quickstart quickstart-seed test unit bench bench-dataplane peers peer-smoke inference-perf e2e-vllm image clean system-deps

$(STAMP): pyproject.toml
	@$(PY) -c 'import sys; assert sys.version_info >= (3, 11), "ingate needs Python 3.11+"'
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

## quickstart: set up and run the gateway in front of a simulated fleet (the main job)
quickstart: $(STAMP)
	$(BIN)/ingate quickstart

## quickstart-seed: regenerate the Inference Quickstart's seed curves (virtual-time sweeps, ~5 min)
quickstart-seed: $(STAMP)
	$(BIN)/python benchmarks/quickstart/seed.py

## system-deps: Debian packages the tests use (redis-server; chromium for the quickstart page test),
## installed when missing and root; otherwise those tests are skipped (the page test fails under CI=true)
system-deps:
	@command -v redis-server >/dev/null 2>&1 || test -x /usr/bin/redis-server || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -q && apt-get install -y -q redis-server; \
	  else echo "note: redis-server is missing (apt-get install -y redis-server): Redis tests will be skipped"; fi; }
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; \
	  else echo "note: chromium is missing (apt-get install -y chromium): the quickstart page test will be skipped"; fi; }

## test: set up, lint, type-check and run the whole test suite
test: $(STAMP) system-deps
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

## bench: regenerate benchmarks/results (shared-prefix + mixed, every system incl. the peers)
bench: $(STAMP) peers
	$(BIN)/ingate bench all

## peers: install sglang-router and vllm-router (exact pins) into their own venv, .venv-peers
peers: $(STAMP)
	@test -x .venv-peers/bin/sglang-router -a -x .venv-peers/bin/vllm-router || $(BIN)/ingate bench install-peers

## inference-perf: run inference-perf (own venv, .venv-iperf) offline against ingate, shared-prefix config
inference-perf: $(STAMP)
	INGATE=$(BIN)/ingate benchmarks/inference-perf/run.sh

## bench-dataplane: Envoy + picker overhead side by side (plain Envoy, null picker, ingate) at 1 and 32
## streams, then 32 KB / 220 KB / 1 MB prompts; JSON in benchmarks/results/dataplane/ (~10 min)
DP := $(BIN)/python benchmarks/dataplane/overhead.py
DP_PLANES := envoy-rr,envoy-extproc-null,envoy-extproc
bench-dataplane: $(STAMP)
	$(DP) --sets tiny,stream --concurrency 1,32 --only $(DP_PLANES),envoy-extproc-req --rounds 4 \
		--duration 8 --stream-duration 8 --out benchmarks/results/dataplane/restated.json
	for n in 32768 225280 1048576; do \
		$(DP) --sets tiny --concurrency 8 --duration 6 --rounds 2 --only $(DP_PLANES) --prompt-bytes $$n \
			--out benchmarks/results/dataplane/large_$$n.json || exit 1; done

## peer-smoke: install the peer routers and run one low-rate point each through the harness, checking
## their own counters show the policy at work (~2 min; not in `make test`)
peer-smoke: $(STAMP) peers
	$(BIN)/python -m pytest -p no:cacheprovider -q tests/e2e/test_bench_peer_routers.py

## e2e-vllm: opt-in check against real vLLM on CPU (own venv .venv-vllm, ~3.5 GB; not in `make test`)
e2e-vllm: $(STAMP)
	tests/vllm/setup_vllm_cpu.sh
	INGATE_VLLM_BIN=$(CURDIR)/.venv-vllm/bin/vllm INGATE_VLLM_MODEL=$(CURDIR)/.vllm-tiny-llama \
		$(BIN)/python -m pytest tests/vllm -p no:cacheprovider

## image: build the picker image (docker, podman or buildah, whichever is installed; not in `make test`)
## IMAGE=... names it; BASE_IMAGE=... builds on a mirror of python:3.11-slim
IMAGE ?= ingate:0.1.0
image:
	@engine=$$(command -v docker || command -v podman || command -v buildah) || { echo "no docker, podman or buildah"; exit 1; }; \
	case "$$engine" in */buildah) build="$$engine bud";; *) build="$$engine build";; esac; \
	set -x; $$build $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) -t $(IMAGE) .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
