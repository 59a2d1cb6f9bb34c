#!/usr/bin/env bash
# Download, on a machine with registry access, the wheels scripts/gpu_check.sh installs on a GPU
# machine that has no network. That image has Python 3.12, torch, transformers (5.17, so
# huggingface-hub < 2), safetensors, numpy, pyyaml, tqdm and pyarrow, but not obstore, pydantic,
# datasets and their small dependencies.
#   scripts/gpu_wheels.sh [DEST]      # default .gpu_wheels (git-ignored); prints what it fetched
# PY_VERSION=3.11 fetches for another Python (to rehearse the install where there is no 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu_wheels}
PY=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
# datasets 5.0.1 is the newest that accepts huggingface-hub < 2 (transformers 5.17's bound) and
# pyarrow >= 21; pandas < 3 accepts numpy >= 1.26, so the image's numpy is never replaced.
PACKAGES=(obstore pydantic "datasets==5.0.1" "pandas<3")
# In the image, and too big to carry (pyarrow alone is 55 MB): left out. Small ones the image also
# has stay, in case its versions are older than datasets asks for.
IMAGE_HAS=(numpy pyarrow)
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download --quiet --only-binary=:all: --implementation cp --python-version "$PY_VERSION" \
  --abi "cp${PY_VERSION/./}" --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$DEST" "${PACKAGES[@]}"
for name in "${IMAGE_HAS[@]}"; do
  rm -f "$DEST/${name}"-[0-9]*.whl "$DEST/${name//-/_}"-[0-9]*.whl
done
ls -1 "$DEST"
total=$(du -sm "$DEST" | cut -f1)
echo "$(ls "$DEST" | wc -l) wheels, ${total} MB in $DEST"
if [ "$total" -ge 60 ]; then
  echo "error: $DEST is ${total} MB, over the 60 MB the GPU machine takes" >&2
  exit 1
fi
