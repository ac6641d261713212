# Sourced by the scripts in this folder: make .venv (once) and install noisewise with the extras
# given in $NW_EXTRAS into it. Safe to re-run; installs nothing that is already there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned to the CPU build this machine keeps on disk (fast, no multi-GB CUDA download).
# Elsewhere set NW_TORCH to the torch requirement you want (e.g. "torch" for your platform's default).
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q "${NW_TORCH:-torch==2.13.0}"
fi
"$VPY" -m pip install -q -e ".[${NW_EXTRAS}]"
