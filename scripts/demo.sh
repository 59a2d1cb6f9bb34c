#!/usr/bin/env bash
# Fresh machine to demo: install, then collect with a tiny local model into ./vault and read it back.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m activault demo "$@"
