#!/usr/bin/env bash
# Install activault (editable) and its Python dependencies. Idempotent; EXTRAS="[test]" adds test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# A bare `torch>=2.4` would pull the newest (multi-GB CUDA) build; pin one when torch is missing.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$PY" -m pip install -q -e ".${EXTRAS:-}"
