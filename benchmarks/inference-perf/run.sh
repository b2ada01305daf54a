#!/usr/bin/env bash
# Run inference-perf (PyPI 0.7.0) against ingate in front of 8 simulated replicas, fully offline.
#   benchmarks/inference-perf/run.sh [CONFIG]      (default: benchmarks/inference-perf/shared-prefix.yaml)
# inference-perf lives in its own venv ($IPERF_VENV, default .venv-iperf), created on first use: with a
# Python >= 3.12 if one is found (what 0.7.0 declares), else with this Python and
# `--no-deps --ignore-requires-python` plus its dependencies. Results go where CONFIG's
# storage.local_storage.path says (/tmp/ingate-inference-perf for the shipped config).
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${1:-benchmarks/inference-perf/shared-prefix.yaml}
IPERF_VENV=${IPERF_VENV:-.venv-iperf}
INGATE=${INGATE:-.venv/bin/ingate}
TOKENIZER_DIR=${TOKENIZER_DIR:-/tmp/ingate-tokenizer}
WORK=$(mktemp -d /tmp/ingate-iperf-XXXXXX)

if [ ! -x "$IPERF_VENV/bin/inference-perf" ]; then
  # The first candidate that runs: a pyenv shim named python3.12 exists even where no 3.12 is selected.
  PY312=""
  for c in $(command -v python3.12) /root/.pyenv/versions/3.12*/bin/python3.12; do
    if [ -x "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      PY312=$c
      break
    fi
  done
  if [ -n "$PY312" ]; then
    "$PY312" -m venv "$IPERF_VENV"
    "$IPERF_VENV/bin/pip" install -q inference-perf==0.7.0
  else
    python3 -m venv "$IPERF_VENV"
    "$IPERF_VENV/bin/pip" install -q --no-deps --ignore-requires-python inference-perf==0.7.0
    "$IPERF_VENV/bin/pip" install -q aiohttp pydantic datasets jinja2 pyyaml transformers tokenizers \
      numpy prometheus-client rich tqdm aiofiles google-cloud-storage boto3 huggingface-hub
  fi
fi

"$INGATE" bench tokenizer "$TOKENIZER_DIR"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
"$INGATE" sim --replicas 8 --base-port 18100 --time-scale 0.1 --num-gpu-blocks 800 \
  --ready-file "$WORK/sim-ready.json" >"$WORK/sim.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 300); do [ -f "$WORK/sim-ready.json" ] && break; sleep 0.1; done
"$INGATE" serve --config benchmarks/inference-perf/gateway.yaml --log-level warning >"$WORK/ingate.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 300); do curl -sf -o /dev/null http://127.0.0.1:18080/ready && break; sleep 0.1; done
curl -sf -o /dev/null http://127.0.0.1:18080/ready || { cat "$WORK/ingate.log"; exit 1; }

HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  "$IPERF_VENV/bin/inference-perf" --config_file "$CONFIG"
