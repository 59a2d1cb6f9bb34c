#!/usr/bin/env bash
# Fresh machine to green suite: install into .venv with the test tools and servers (S3: moto, s3rver;
# Slurm; Ray), run pytest with the arguments given. PYTHON= uses your own interpreter; SKIP_SETUP=1
# skips the installs (done before).
#
# It leaves nothing running, also on failure or Ctrl-C: the local Slurm cluster is stopped if this
# script started it, and every other process started under it (S3 servers, Ray, Slurm jobs) carries
# ACTIVAULT_TEST_RUN in its environment and is ended at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/prereqs.sh test  # npm, Slurm or root: named before a long install, not after
if [ -z "${SKIP_SETUP:-}" ]; then
    EXTRAS="[test]" bash scripts/setup.sh
    bash scripts/install_s3rver.sh
    PYTHON="${PYTHON:-$PWD/.venv/bin/python}" bash scripts/install_integrations.sh  # SAELens, sparsify, dictionary_learning
fi
PY=${PYTHON:-$PWD/.venv/bin/python}

# Ends the processes whose environment holds this run's tag: TERM, then KILL after 10 s.
reap() {
    local tag=$1 pids p i
    for i in $(seq 100); do
        pids=""
        for p in $(grep -lsxz -- "ACTIVAULT_TEST_RUN=$tag" /proc/[0-9]*/environ | cut -d/ -f3); do
            [ "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null || echo Z)" = Z ] || pids+=" $p"
        done
        [ -n "$pids" ] || return 0
        if [ "$i" = 1 ]; then
            echo "test.sh: ending what the suite left running:$pids" >&2
            # shellcheck disable=SC2086
            kill -TERM $pids 2>/dev/null || true
        fi
        sleep 0.1
    done
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
}

cleanup() {
    local rc=$? tag=$ACTIVAULT_TEST_RUN
    set +e  # stop everything, whatever fails on the way
    trap - EXIT
    trap 'kill -KILL "$PYTEST_PID" 2>/dev/null' INT TERM  # a second Ctrl-C: no more teardown
    unset ACTIVAULT_TEST_RUN  # what runs from here on is not part of the suite
    if [ -n "$PYTEST_PID" ]; then
        kill -TERM "$PYTEST_PID" 2>/dev/null
        wait "$PYTEST_PID"
    fi
    if [ "$SLURM_STARTED" = 1 ]; then bash scripts/slurm_local.sh stop || rc=1; fi
    reap "$tag"
    exit "$rc"
}

ACTIVAULT_TEST_RUN="$$-$(date +%s%N)"
export ACTIVAULT_TEST_RUN
SLURM_STARTED=0
PYTEST_PID=""
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if ! sinfo -h >/dev/null 2>&1; then
    SLURM_STARTED=1
    bash scripts/slurm_local.sh start
fi
# In the background, so that a signal runs the traps at once (bash runs them only after a foreground
# command ends). tests/conftest.py makes SIGTERM and SIGINT a Ctrl-C: the fixtures' teardown runs.
"$PY" -m pytest "$@" &
PYTEST_PID=$!
rc=0
wait "$PYTEST_PID" || rc=$?
PYTEST_PID=""
exit "$rc"
