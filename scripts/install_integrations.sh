#!/usr/bin/env bash
# The libraries activault.integrations works with (SAELens, EleutherAI sparsify, dictionary_learning),
# installed without changing the torch, transformers and datasets already there. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
"$PY" -c 'import torch, transformers, datasets as d; print(f"torch=={torch.__version__}\ntransformers=={transformers.__version__}\ndatasets=={d.__version__}")' >"$pins"
"$PY" -m pip install -q -c "$pins" "sae-lens>=6" "eai-sparsify>=1.3" "python-socketio[client]" zstandard
# dictionary-learning needs nnsight, which requires torchvision and diffusers and so would replace torch;
# the parts of both that are imported need neither, so they come without their declared dependencies.
"$PY" -m pip install -q --no-deps "dictionary-learning>=0.1" "nnsight==0.3.7"
