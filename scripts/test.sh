#!/usr/bin/env bash
# Fresh machine to green suite: install test tools and servers (S3: moto, s3rver; Slurm; Ray), run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="[test]" bash scripts/setup.sh
bash scripts/install_s3rver.sh
bash scripts/slurm_local.sh start
exec "${PYTHON:-python3}" -m pytest "$@"
