#!/usr/bin/env bash
# The README's two commands on a brand-new Debian: build a minimal Debian root with debootstrap,
# install only what the README asks for, clone this repository (its committed HEAD) into it, and run
# `bash scripts/demo.sh` and `bash scripts/test.sh` inside chroot with a clean environment. Then it
# checks that no process is left running in the root, and writes the timings.
#
#   sudo bash scripts/fresh_machine_check.sh [DIR]   # DIR: work folder, default /tmp/activault-fresh
#
# Needs root and the network: Debian's mirror, PyPI and npm (nothing else; the Hugging Face Hub is not
# used). Results: DIR/timings.txt, DIR/{debootstrap,packages,demo,test}.log; the root is DIR/root
# (DIR is emptied first). Settings from the environment: SUITE (bookworm), MIRROR
# (http://deb.debian.org/debian), TORCH and TORCH_INDEX_URL (passed to scripts/setup.sh),
# PYTEST_ARGS (passed to scripts/test.sh, default none), KEEP=1 keeps the root afterwards, and
# CA_BUNDLE=FILE for a network behind a TLS-inspecting proxy: the certificates are copied into the
# root and pip, npm and Python are told to trust them (PIP_CERT, NODE_EXTRA_CA_CERTS, SSL_CERT_FILE).
# Reaching the registries as this machine does: PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, npm_config_registry
# and the proxy variables (http_proxy, https_proxy, no_proxy, in either case) pass through when set,
# and WHEELS=DIR copies a folder of wheels into the root for pip (--find-links), e.g. torch's CPU build
# where PyTorch's index is out of reach (then TORCH=cpu TORCH_INDEX_URL=https://pypi.org/simple).
#
# As in Debian's container images, a policy-rc.d stops apt from starting services (munge) inside the
# root: there is no init in a chroot, and a daemon started by apt would outlive the check.
set -euo pipefail

DIR=$(realpath -m "${1:-/tmp/activault-fresh}")
ROOT=$DIR/root
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
REPO=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
PACKAGES="python3 python3-venv npm"  # what the README asks for (the clone is made from outside: no git)

die() { echo "fresh_machine_check.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot, mounts)"
case "$DIR" in /|/tmp|/root|/home|/work) die "refusing DIR=$DIR: give a folder of its own" ;; esac
[ -z "${WHEELS:-}" ] || [ -d "$WHEELS" ] || die "WHEELS=$WHEELS is not a folder: give a folder of .whl files, or unset it"

mounts_under() { awk -v d="$1/" 'index($2 "/", d) == 1 {print $2}' /proc/self/mounts | sort -r; }

unmount_all() {
    local m
    for m in $(mounts_under "$ROOT"); do
        umount "$m" 2>/dev/null || umount -l "$m"
    done
}

in_root() {  # pids of the processes whose root directory is the Debian root
    local p
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/root" 2>/dev/null)" = "$ROOT" ] && echo "${p#/proc/}"
    done
    return 0
}

cleanup() {
    local rc=$? pids
    set +e
    trap - EXIT INT TERM
    pids=$(in_root)
    if [ -n "$pids" ]; then
        echo "LEFT RUNNING in the root: $(ps -o pid=,args= -p "$(echo "$pids" | paste -sd,)" \
            | tr '\n' ';')" | tee -a "$TIMINGS"
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null
        sleep 1
        rc=1
    elif [ -d "$ROOT/root/activault" ]; then
        echo "no process left running in the root" | tee -a "$TIMINGS"
    fi
    unmount_all
    [ -z "$(mounts_under "$ROOT")" ] || echo "fresh_machine_check.sh: still mounted under $ROOT" >&2
    if [ "${KEEP:-}" != 1 ] && [ -z "$(mounts_under "$ROOT")" ]; then
        rm -rf --one-file-system "$ROOT"
    fi
    exit "$rc"
}

now() { date +%s; }
TIMINGS=$DIR/timings.txt
step() {  # step NAME COMMAND...: run it with its output in DIR/NAME.log, record its duration
    local name=$1 t0 rc=0
    shift
    echo "== $name (log: $DIR/$name.log)"
    t0=$(now)
    "$@" >"$DIR/$name.log" 2>&1 || rc=$?
    printf '%-12s %5ds  exit %d\n' "$name" $(($(now) - t0)) "$rc" | tee -a "$TIMINGS"
    grep -E '^=+ .*(passed|failed).* in .* =+$' "$DIR/$name.log" | tail -n 1 | tee -a "$TIMINGS" || true
    if [ "$rc" != 0 ]; then
        tail -n 30 "$DIR/$name.log" >&2
        die "$name failed (exit $rc); see $DIR/$name.log"
    fi
}

# A fresh DIR: never delete through a mount (a bound /dev would take the host's with it).
if [ -n "$(mounts_under "$ROOT")" ]; then unmount_all; fi
[ -z "$(mounts_under "$ROOT")" ] || die "could not unmount $(mounts_under "$ROOT")"
rm -rf --one-file-system "$DIR"
mkdir -p "$DIR"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
{
    echo "fresh_machine_check.sh $(date -u +%FT%TZ) on $(uname -srm), $(nproc) cores"
    echo "repo $REPO at $(git -C "$REPO" rev-parse --short HEAD); Debian $SUITE from $MIRROR"
} | tee "$TIMINGS"

command -v debootstrap >/dev/null || step host-tools apt-get install -y -qq debootstrap
step debootstrap debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR"

printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod +x "$ROOT/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
[ -s "$ROOT/etc/hosts" ] || printf '127.0.0.1 localhost\n::1 localhost\n' >"$ROOT/etc/hosts"
CA_ENV=()
if [ -n "${CA_BUNDLE:-}" ]; then
    install -D -m 0644 "$CA_BUNDLE" "$ROOT/etc/ssl/extra-ca.pem"
    for v in PIP_CERT REQUESTS_CA_BUNDLE SSL_CERT_FILE NODE_EXTRA_CA_CERTS npm_config_cafile; do
        CA_ENV+=("$v=/etc/ssl/extra-ca.pem")
    done
fi
NET_ENV=()
for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL npm_config_registry http_proxy https_proxy no_proxy \
    HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    if [ -n "${!v:-}" ]; then NET_ENV+=("$v=${!v}"); fi
done
if [ -n "${WHEELS:-}" ]; then
    mkdir -p "$ROOT/opt/wheels"
    cp -r "$WHEELS"/. "$ROOT/opt/wheels/"
    NET_ENV+=("PIP_FIND_LINKS=/opt/wheels")
fi
mount -t proc proc "$ROOT/proc"
# /sys with what lies under it, as a booted machine has it: slurmd needs /sys/fs/cgroup.
for d in sys dev; do
    mount --rbind "/$d" "$ROOT/$d"
    mount --make-rslave "$ROOT/$d"
done

# A clean environment: nothing of the host's (pip find-links, caches, PATH) leaks in.
inside() {
    chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        ${TORCH:+TORCH=$TORCH} ${TORCH_INDEX_URL:+TORCH_INDEX_URL=$TORCH_INDEX_URL} "${CA_ENV[@]}" "${NET_ENV[@]}" \
        bash -c "$1"
}
step packages inside "apt-get update -qq && apt-get install -y -qq --no-install-recommends $PACKAGES"
step clone git clone -q --no-local "$REPO" "$ROOT/root/activault"
echo "cloned $(git -C "$ROOT/root/activault" log -1 --format='%h %s')" | tee -a "$TIMINGS"
step demo inside 'cd /root/activault && bash scripts/demo.sh'
step test inside "cd /root/activault && bash scripts/test.sh ${PYTEST_ARGS:-}"

