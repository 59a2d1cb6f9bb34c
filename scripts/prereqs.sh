#!/usr/bin/env bash
# What the README's commands need from the system, checked before anything is installed: every missing
# piece is named with the one command that provides it, and the script exits 1 if any is missing.
#
#   bash scripts/prereqs.sh demo    # scripts/demo.sh: a Python >= 3.10 that can make a venv
#   bash scripts/prereqs.sh test    # scripts/test.sh: that, plus npm (s3rver) and Slurm or root + apt-get
#
# PYTHON=/path/to/python (your own environment) skips the venv check, as scripts/setup.sh does.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-demo}
missing=()

if [ -n "${PYTHON:-}" ]; then
    "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null \
        || missing+=("PYTHON=$PYTHON is not a Python >= 3.10: point PYTHON at one, or unset it to use python3")
elif [ ! -x .venv/bin/python ]; then
    base=${BASE_PYTHON:-python3}
    if ! command -v "$base" >/dev/null; then
        missing+=("$base: not found; on Debian or Ubuntu: apt-get install python3 python3-venv")
    elif ! "$base" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
        missing+=("$base is $("$base" -V 2>&1); activault needs Python >= 3.10: install one and pass BASE_PYTHON=/path/to/it")
    elif ! "$base" -c 'import ensurepip, venv' 2>/dev/null; then
        # Debian's python3 has venv without ensurepip: `python3 -m venv` then fails half-way.
        missing+=("$base cannot make a virtual environment (no ensurepip); on Debian or Ubuntu: apt-get install python3-venv")
    fi
fi

if [ "$what" = test ]; then
    if [ ! -x .ci/node_modules/.bin/s3rver ] && ! command -v npm >/dev/null; then
        missing+=("npm: not found (it installs the s3rver test server); on Debian or Ubuntu: apt-get install npm")
    fi
    if ! command -v sinfo >/dev/null || ! command -v slurmd >/dev/null; then
        # scripts/slurm_local.sh installs slurm-wlm and munge with apt-get and runs the daemons as root.
        if [ "$(id -u)" != 0 ]; then
            missing+=("Slurm is not installed and this is not root: run the tests as root (they install slurm-wlm and munge with apt-get and run a local cluster), or install slurm-wlm and munge first")
        elif ! command -v apt-get >/dev/null; then
            missing+=("Slurm is not installed and there is no apt-get to install it: install slurm-wlm (slurmctld, slurmd, sbatch) and munge with your package manager")
        fi
    elif [ "$(id -u)" != 0 ] && ! sinfo -h >/dev/null 2>&1; then
        missing+=("Slurm is installed but no cluster answers and this is not root: run the tests as root (scripts/slurm_local.sh starts a local cluster), or start your cluster first")
    fi
elif [ "$what" != demo ]; then
    echo "prereqs.sh: say 'demo' or 'test', not '$what'" >&2
    exit 2
fi

if [ ${#missing[@]} -gt 0 ]; then
    echo "Before installing anything, scripts/$what.sh needs:" >&2
    for m in "${missing[@]}"; do echo "  - $m" >&2; done
    exit 1
fi
