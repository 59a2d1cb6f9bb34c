#!/bin/bash
# Submit machines START..END (inclusive) of an N-machine collection to Slurm.
#
#   scripts/run_slurm_jobs.sh CONFIG N START END [--array] [--max-parallel K] [--wait]
#                             [--sbatch-arg=--partition=gpu ...] [--log-dir logs]
#
# N must equal the config's num_runs (checked before anything is submitted). One job per machine
# (MACHINE=i exported), or one job array with --array. Writes logs/slurm_jobs_TIME.txt mapping
# machine to job id; each job writes logs/activault-JOB.out. A failed machine is rerun with the
# same command and START=END=i: it resumes, the other machines' files are not touched.
set -euo pipefail

if [ "$#" -lt 4 ]; then
    echo "usage: $0 CONFIG N START END [--array] [--max-parallel K] [--wait] [--sbatch-arg=ARG ...]" >&2
    echo "example: $0 configs/llama3.3_70b.yaml 8 2 5   # machines 2,3,4,5 of 8" >&2
    exit 1
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "${PYTHON:-python}" -m activault launch slurm "$@" --script "$HERE/collect.slurm"
