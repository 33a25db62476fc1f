#!/bin/bash
# PID 1 of a netbooted node, inside the image's root (read-only squashfs under a tmpfs overlay).
# It applies the hostname, loads the accelerator's modules and follows the node's plan (builder.plan=URL,
# checked against builder.plan_sha256): one line per process, RPC workers, llama-servers and vLLM servers,
# each started through the image's own entrypoint on the node's own address (never a wildcard one), announced
# on the console once it accepts connections, and restarted on its own if it exits. The plan's lines and
# their fields are documented in builder/netboot/plan.py, which writes them; its env lines are exported first.
# Every process's output stays on /dev/console and is also kept, bounded, under /run/builder/logs (plan.sh's
# keep_log), with the node's own `builder-node:` lines in node.log: `builder cluster logs` reads them over ssh.
set -u
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
bb=/usr/lib/builder/busybox

# Each line on the console, and in the node log (/run/builder/logs/node.log, keep_log in plan.sh) unless this
# runs where keep_log copies the output there already.
say() {
    echo "builder-node: $*"
    [ -n "$IN_LOG" ] || node_log "builder-node: $*"
}

# shellcheck disable=SC1091  # the plan executor, images/netboot/plan.sh (checked on its own)
. /usr/lib/builder/plan.sh
mkdir -p "$LOG_DIR"
# bash's process substitution (keep_log's pipes) opens /dev/fd/N, which a devtmpfs without udev lacks
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd

name=node plan="" plan_sha256=""
read -r -a words </proc/cmdline
for word in "${words[@]}"; do
    case "$word" in
        builder.name=*) name=${word#*=} ;;
        builder.plan=*) plan=${word#*=} ;;
        builder.plan_sha256=*) plan_sha256=${word#*=} ;;
    esac
done

# shellcheck disable=SC1091
. /run/builder/net.env
# The data network, when the node has one (DATA_IFACE, DATA_IP, DATA_PREFIX): its RPC workers bind DATA_IP
# shellcheck disable=SC2034  # DATA_IFACE and RPC_IP are read by plan.sh, sourced below
DATA_IFACE="" DATA_IP=""
# shellcheck disable=SC1091  # written by the initramfs
[ -f /run/builder/data.env ] && . /run/builder/data.env
# shellcheck disable=SC2034
RPC_IP=${DATA_IP:-$NODE_IP}
# ROOT_MODE (ram or cache), ROOT_BLOB, MODEL_CACHED (sha256s of the models kept on the cache disk, with room
# made for them), VERITY_ERRORS
# shellcheck disable=SC2034  # read by plan.sh, sourced below
ROOT_MODE=ram ROOT_BLOB="" MODEL_CACHED="" VERITY_ERRORS=0 CACHE_DIR=/run/builder/cache
# shellcheck disable=SC1091  # written by the initramfs
. /run/builder/root.env
cp /run/builder/resolv.conf /etc/resolv.conf 2>/dev/null || true
hostname "$name"
echo "$name" >/etc/hostname
echo "$NODE_IP $name" >>/etc/hosts
set -a
# shellcheck disable=SC1091
. /usr/lib/builder/image.env
set +a

if [ -s /usr/lib/builder/modules.load ]; then
    while read -r module; do
        loaded=${module%.ko}
        [ -d "/sys/module/${loaded//-/_}" ] && continue  # already loaded by the initramfs
        "$bb" insmod "/lib/modules/$module" 2>/dev/null || say "could not load ${module##*/}"
    done </usr/lib/builder/modules.load
fi

# The boot lease is renewed for as long as the node runs: udhcpc stays in the foreground as PID 1's child, asks
# for the address the node holds, and its event script keeps that address (images/netboot/udhcpc.sh).
"$bb" udhcpc -f -i "$NODE_IFACE" -r "$NODE_IP" -t 5 -T 3 -A 20 -s /usr/lib/builder/udhcpc.sh &
say "DHCP: the lease of $NODE_IP on $NODE_IFACE is renewed for as long as the node runs (udhcpc pid $!)"

if [ -z "$plan" ] || [ -z "$plan_sha256" ]; then
    say "no builder.plan= and builder.plan_sha256= on the kernel command line: nothing to run (publish the node again)"
    while :; do sleep 3600; done
fi
run_plan
