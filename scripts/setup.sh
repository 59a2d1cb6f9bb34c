#!/usr/bin/env bash
# Install activault (editable) and its dependencies into the project virtual environment .venv.
# Idempotent.
#
#   bash scripts/setup.sh                  # .venv made with python3 -m venv; torch from PyPI
#   TORCH=cpu bash scripts/setup.sh        # torch's CPU-only build (enough for the demo and the tests)
#   EXTRAS="[test]" bash scripts/setup.sh  # adds the test tools
#   PYTHON=/path/to/python bash scripts/setup.sh   # install into that interpreter's environment instead
#
# torch: on Linux x86_64 the PyPI wheel is the CUDA build; with the nvidia-* libraries and triton it
# pulls ~4.5 GB installed. That is the one to collect with on GPUs. TORCH=cpu takes the CPU-only wheel
# (190 MB, 750 MB installed) from PyTorch's index (TORCH_INDEX_URL overrides it, e.g.
# https://download.pytorch.org/whl/cu126 for another CUDA). A torch already importable is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
else
    PY=$PWD/.venv/bin/python
    if [ ! -x "$PY" ]; then
        echo "creating the virtual environment .venv"
        if ! "${BASE_PYTHON:-python3}" -m venv .venv; then
            rm -rf .venv
            echo "setup.sh: '${BASE_PYTHON:-python3} -m venv' failed; on Debian or Ubuntu install it with" \
                "'apt-get install python3-venv', or pass PYTHON=/path/to/python" >&2
            exit 1
        fi
    fi
fi

TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if ! "$PY" -c "import torch" 2>/dev/null; then
    # A bare `torch>=2.4` from the package's dependencies would take the newest release: pin one.
    case "${TORCH:-}" in
        cpu) index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu} ;;
        "" | cuda) index=${TORCH_INDEX_URL:-} ;;
        *) echo "setup.sh: TORCH=${TORCH} is not cpu or cuda" >&2; exit 2 ;;
    esac
    if [ "${TORCH:-}" = cpu ]; then
        echo "installing torch==${TORCH_VERSION}, the CPU-only build (~190 MB download)${index:+ from $index}"
    else
        echo "installing torch==${TORCH_VERSION}, the CUDA build (~4.5 GB installed; TORCH=cpu takes the" \
            "190 MB CPU-only build, enough for the demo and the tests)${index:+ from $index}"
    fi
    # Not -q: this is the long download, and a silent one looks hung.
    "$PY" -m pip install --progress-bar on "torch==${TORCH_VERSION}" ${index:+--index-url "$index"}
fi
echo "installing activault${EXTRAS:-} (editable)"
"$PY" -m pip install -q -e ".${EXTRAS:-}"

if [ -z "${PYTHON:-}" ]; then
    echo "activault is installed in .venv; to use it: source .venv/bin/activate"
fi
