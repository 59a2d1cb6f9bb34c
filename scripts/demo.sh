#!/usr/bin/env bash
# Fresh machine to demo: install into .venv (scripts/setup.sh; TORCH=cpu for the small CPU-only torch),
# then collect with a tiny local model into ./vault and read it back. PYTHON= uses your own interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/prereqs.sh demo
EXTRAS="${EXTRAS:-[plot]}" bash scripts/setup.sh  # [plot]: the README's `activault stats --plot`
exec "${PYTHON:-$PWD/.venv/bin/python}" -m activault demo "$@"
