#!/usr/bin/env bash
# The GPU check (issue 14): correctness and speed of the CUDA path in one run of under 8 minutes.
#   scripts/gpu_check.sh OUTDIR [--cpu] [--budget SECONDS]
# Writes OUTDIR/gpu_check.json and OUTDIR/summary.md. Without CUDA (or with --cpu) it runs the CPU
# parts at small sizes and reports the GPU parts as skipped. Modules the image lacks are installed
# from the wheels of scripts/gpu_wheels.sh ($WHEELS, default .gpu_wheels), never from a network.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: scripts/gpu_check.sh OUTDIR [--cpu] [--budget SECONDS]" >&2; exit 2; }
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.gpu_wheels}
"$PY" - <<'PYEOF' || true
import importlib, platform
out = [f"python {platform.python_version()}"]
for m in ("torch", "transformers", "huggingface_hub", "numpy", "pyarrow", "pip"):
    try:
        out.append(f"{m} {importlib.import_module(m).__version__}")
    except Exception as e:
        out.append(f"{m} missing ({type(e).__name__})")
print("image:", ", ".join(out))
PYEOF
for module in obstore pydantic datasets; do
  if ! "$PY" -c "import $module" 2>/dev/null; then
    if [ ! -d "$WHEELS" ]; then
      echo "error: $module is missing and there is no $WHEELS folder; run scripts/gpu_wheels.sh on a machine with registry access first" >&2
      exit 2
    fi
    echo "installing $module from $WHEELS"
    # PIP_BREAK_SYSTEM_PACKAGES: an image's system Python refuses pip otherwise (PEP 668).
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "$module"
  fi
done
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export GPU_CHECK_TMP=${GPU_CHECK_TMP:-$PWD/.gpu_work}  # the machine's own disk, not a tmpfs /tmp
mkdir -p "$GPU_CHECK_TMP"
exec "$PY" -m bench.gpu "$@"
