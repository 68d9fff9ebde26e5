#!/usr/bin/env bash
# Idempotent setup: .venv at the repo root with torch (CPU build unless a GPU is
# present) and braid installed editable with its test extras.
#   BRAID_TORCH_VERSION  torch version to install (default 2.13.0)
#   BRAID_TORCH_INDEX    index URL for torch (default: PyPI on GPU hosts, the
#                        PyTorch CPU index elsewhere, unless a local wheel exists)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${BRAID_TORCH_VERSION:-2.13.0}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if "$VPY" -m pip install -q --no-index --no-deps "torch==$TORCH_VERSION" >/dev/null 2>&1; then
    # a local wheel (find-links) had it; now fetch its dependencies
    "$VPY" -m pip install -q "torch==$TORCH_VERSION"
  elif [ -n "${BRAID_TORCH_INDEX:-}" ]; then
    "$VPY" -m pip install -q "torch==$TORCH_VERSION" --index-url "$BRAID_TORCH_INDEX" --extra-index-url https://pypi.org/simple
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "$VPY" -m pip install -q "torch==$TORCH_VERSION"
  else
    "$VPY" -m pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
  fi
fi

stamp=.venv/.braid-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VPY" -m pip install -q -e ".[test]"
  # Mooncake (optional): its tests skip with the reason when it cannot be installed or loaded
  if [ "${BRAID_SKIP_MOONCAKE:-0}" != 1 ]; then
    extra=rdma-cpu
    command -v nvidia-smi >/dev/null 2>&1 && extra=rdma
    "$VPY" -m pip install -q -e ".[$extra]" || echo "braid: Mooncake not installed; its tests will skip"
  fi
  touch "$stamp"
fi
echo "braid: environment ready in .venv ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
