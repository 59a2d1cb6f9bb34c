#!/usr/bin/env bash
# A single-node Slurm cluster on localhost, for tests and CI. Run as root.
#
#   scripts/slurm_local.sh start    # install if missing, write configs, start munged/slurmctld/slurmd,
#                                   # wait until `sinfo` shows the node idle (idempotent)
#   scripts/slurm_local.sh stop     # stop the daemons this script started
#   scripts/slurm_local.sh status   # sinfo
#
# No cgroups (proctrack/linuxproc, task/none), so it runs in an unprivileged container.
# Writes /etc/slurm/slurm.conf (the default location, so sinfo/sbatch need no SLURM_CONF).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
RUN=/run/slurm
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-90}

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    echo "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null
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
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log)"
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

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_state() { sinfo -h -N -n localhost -o '%t' 2>/dev/null | head -n1; }

start() {
    [ "$(id -u)" = 0 ] || die "run as root (it writes /etc/slurm and starts daemons)"
    install_packages
    start_munge
    local changed=0
    write_conf && changed=1
    if [ "$changed" = 1 ]; then
        stop_daemons  # restart on a new config
    fi
    running "$RUN/slurmctld.pid" || slurmctld
    running "$RUN/slurmd.pid" || slurmd
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

stop_daemons() {
    local f pid
    for f in "$RUN/slurmd.pid" "$RUN/slurmctld.pid"; do
        if running "$f"; then
            pid=$(cat "$f")
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$f"
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop_daemons ;;
    status) sinfo ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
