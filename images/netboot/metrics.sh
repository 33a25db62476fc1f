#!/bin/bash
# The metrics exporter of a netbooted node (its plan's metrics line): `metrics.sh ADDRESS PORT [SYSFS]`. One
# process, run in the foreground by its unit (builder-metrics.service): Debian's
# prometheus-node-exporter on the node's own address and PORT (never a wildcard one), with the collectors an
# operator of an inference node reads: the GPUs' use and memory from the kernel's sysfs (drm: amdgpu's
# gpu_busy_percent and mem_info_*), power, temperatures and fans where the hardware exposes them (hwmon: e.g.
# amdgpu's power1_average, i915's energy counters), CPU, memory, load, pressure, network and filesystems.
# SYSFS (default /sys) is where the kernel's sysfs is read from. It says when it accepts connections.
set -eu
address=$1 port=$2 sysfs=${3:-/sys}
say() { echo "builder-node: $*"; }
listen=$address:$port
[[ $address == *:* ]] && listen="[$address]:$port"
# it needs no privilege: run it as nobody where util-linux's setpriv is there (every Debian root has it)
as=()
command -v setpriv >/dev/null && as=(setpriv --reuid=65534 --regid=65534 --clear-groups --no-new-privs --)
"${as[@]}" /usr/bin/prometheus-node-exporter --web.listen-address="$listen" --path.sysfs="$sysfs" \
    --collector.disable-defaults --collector.drm --collector.hwmon --collector.thermal_zone \
    --collector.cpu --collector.meminfo --collector.loadavg --collector.pressure --collector.netdev \
    --collector.filesystem --log.level=warn &
child=$!
trap 'kill "$child" 2>/dev/null' TERM INT
for _ in $(seq 1 120); do
    if (exec 3<>"/dev/tcp/$address/$port") 2>/dev/null; then
        say "metrics ready on $listen (prometheus-node-exporter)"
        break
    fi
    kill -0 "$child" 2>/dev/null || break
    sleep 0.5
done
wait "$child"
