#!/bin/bash
# A single-node Slurm cluster on localhost, for tests and CI. Run as root.
#
#   scripts/slurm_local.sh start    # install if missing, write configs, start munged/slurmctld/slurmd,
#                                   # wait until `sinfo` shows the node idle (idempotent)
#   scripts/slurm_local.sh stop     # cancel its jobs, stop the daemons it started, check none is left
#   scripts/slurm_local.sh status   # sinfo
#
# No cgroups (proctrack/linuxproc, task/none), so it runs in an unprivileged container. Daemons start
# in their own session with stdin from /dev/null, output to /var/log/slurm/*.out and no other
# descriptor of the caller. munged is started (and later stopped) only when none answers already.
# Writes /etc/slurm/slurm.conf (the default location, so sinfo/sbatch need no SLURM_CONF).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
RUN=/run/slurm
MUNGED_PID=$RUN/munged.pid  # exists only while a munged started by this script runs
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-90}

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null && command -v pgrep >/dev/null; then
        return
    fi
    echo "installing slurm-wlm, munge and procps (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq slurm-wlm munge procps >/dev/null
}

start_munge() {
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    install -d -m 0755 "$RUN" "$LOGS"
    detached "$LOGS/munged.out" runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
            cp /run/munge/munged.pid "$MUNGED_PID"
            return
        fi
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log and $LOGS/munged.out)"
}

write_conf() {
    local cpus mem
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)  # MiB, leave 20% to the OS
    install -d -m 0755 "$CONF_DIR" "$STATE" "$SPOOL" "$LOGS" "$RUN"
    cat >"$CONF.new" <<EOF
# Written by scripts/slurm_local.sh: one node, localhost, no cgroups.
ClusterName=activault-local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
ReturnToService=2
MinJobAge=600
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPort=6817
SlurmdPort=6818
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    if ! cmp -s "$CONF.new" "$CONF" 2>/dev/null; then
        mv "$CONF.new" "$CONF"
        return 0  # changed
    fi
    rm -f "$CONF.new"
    return 1
}

# Run "$@" (a daemon that forks) holding nothing of the caller: its own session, stdin /dev/null,
# stdout and stderr appended to LOG, every other inherited descriptor closed. A caller's pipe or lock
# file kept open by a daemon blocks the caller long after this script has ended.
detached() {
    local log=$1 fd rc=0
    shift
    (
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
        done
        exec setsid "$@" </dev/null >>"$log" 2>&1
    ) || rc=$?
    [ "$rc" = 0 ] || die "'$*' failed (exit $rc); its output, from $log:
$(tail -n 20 "$log")"
}

alive() {  # any of the pids still running (a zombie counts as gone)
    local p st
    for p; do
        st=$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null || true)
        if [ -n "$st" ] && [ "$st" != Z ]; then return 0; fi
    done
    return 1
}

end_pids() {  # TERM the pids, wait up to 10 s, then KILL what is left
    [ $# -gt 0 ] || return 0
    kill -TERM "$@" 2>/dev/null || true
    for _ in $(seq 100); do
        alive "$@" || return 0
        sleep 0.1
    done
    echo "slurm_local.sh: killing $* (still running 10 s after SIGTERM)" >&2
    kill -KILL "$@" 2>/dev/null || true
}

pid_of() { [ -s "$1" ] && alive "$(cat "$1")" && cat "$1"; }

running() { pid_of "$1" >/dev/null; }

node_state() { sinfo -h -N -n localhost -o '%t' 2>/dev/null | head -n1; }

start() {
    [ "$(id -u)" = 0 ] || die "run as root (it writes /etc/slurm and starts daemons)"
    install_packages
    if write_conf; then
        stop_slurm  # restart on a new config
    fi
    start_munge
    running "$RUN/slurmctld.pid" || detached "$LOGS/slurmctld.out" slurmctld
    # -N: the node is "localhost" whether or not the machine's own hostname resolves (containers).
    running "$RUN/slurmd.pid" || detached "$LOGS/slurmd.out" slurmd -N localhost
    local deadline=$((SECONDS + TIMEOUT)) state=""
    while [ $SECONDS -lt $deadline ]; do
        state=$(node_state || true)
        case "$state" in
            idle|mix|alloc) sinfo; return 0 ;;
            down*|drain*|fail*) scontrol update NodeName=localhost State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    tail -n 20 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 || true
    die "node not idle after ${TIMEOUT}s (state '${state}'); logs above"
}

live() {  # pids of the running processes named NAME (a regex: a|b), zombies left out
    local p
    for p in $(pgrep -x "$1" 2>/dev/null || true); do
        if alive "$p"; then echo "$p"; fi
    done
}

# Cancel every job, then stop slurmd (and the job steps' slurmstepd), slurmctld and its slurmscriptd.
stop_slurm() {
    local ctld d
    ctld=$(pid_of "$RUN/slurmctld.pid" || true)
    d=$(pid_of "$RUN/slurmd.pid" || true)
    if [ -n "$ctld" ]; then
        squeue -h -o %A 2>/dev/null | sort -u | xargs -r scancel 2>/dev/null || true
    fi
    if [ -n "$d" ]; then
        # A slurmstepd outlives slurmd by design: give the cancelled ones 10 s, then end them.
        for _ in $(seq 100); do [ -n "$(live slurmstepd)" ] || break; sleep 0.1; done
        # shellcheck disable=SC2046
        end_pids $(live slurmstepd) "$d"
    fi
    if [ -n "$ctld" ]; then
        # shellcheck disable=SC2046
        end_pids "$ctld" $(pgrep -P "$ctld" || true)
    fi
    rm -f "$RUN/slurmd.pid" "$RUN/slurmctld.pid"
}

stop() {
    local m names='slurmctld|slurmd|slurmscriptd|slurmstepd' left
    m=$(pid_of "$MUNGED_PID" || true)
    stop_slurm
    [ -z "$m" ] || end_pids "$m"
    rm -f "$MUNGED_PID"
    [ -z "$m" ] || names+='|munged'
    left=$(live "$names" | tr '\n' ' ')
    [ -z "$left" ] || die "still running after stop (pids): $left"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
