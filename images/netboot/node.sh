#!/bin/bash
# /usr/lib/builder/node COMMAND [SERVICE-ROLE]: what each of a netbooted node's systemd units runs
# (builder/netboot/nodeunits.py writes the units). systemd is PID 1 and keeps each process running; this only
# sets a process up and hands over to it (exec), so its unit's main process is the process itself.
#   setup           once (builder-node.service): hostname, /etc/hosts, resolv.conf, users, modules
#   dhcp            the boot lease kept renewed (builder-dhcp.service: udhcpc in the foreground)
#   plan            fetch the plan, check its sha256, start one unit per line (builder-plan.service)
#   process S-R     one process of the plan, read from its line (builder-process@S-R.service)
#   ready S-R       until it answers: then its `ready on` line (the unit's ExecStartPost)
#   stopped S-R     after it exits (ExecStopPost): says so, checks the root against dm-verity
#   qualify         the image's qualification on this node (builder-qualify.service; exit 3: unqualified)
#   agent | sshd | metrics   the gateway's agent, the ssh server, the exporter, when the plan names them
set -u
bb=/usr/lib/builder/busybox
say() { echo "builder-node: $*"; }
# shellcheck disable=SC1091  # images/netboot/plan.sh (checked on its own)
. /usr/lib/builder/plan.sh

name=node plan="" plan_sha256=""
read -r -a words <"${NODE_CMDLINE:-/proc/cmdline}"  # NODE_CMDLINE: tests/support/nodeharness.py's stand-in
for word in "${words[@]}"; do
    case "$word" in
        builder.name=*) name=${word#*=} ;;
        builder.plan=*) plan=${word#*=} ;;
        builder.plan_sha256=*) plan_sha256=${word#*=} ;;
    esac
done
# shellcheck disable=SC1091  # written by the initramfs
. /run/builder/net.env
# The data network, when the node has one (DATA_IFACE, DATA_IP, DATA_PREFIX): its RPC workers bind DATA_IP
DATA_IFACE="" DATA_IP=""
# shellcheck disable=SC1091  # written by the initramfs
[ -f /run/builder/data.env ] && . /run/builder/data.env
RPC_IP=${DATA_IP:-$NODE_IP}
# ROOT_MODE (ram or cache), ROOT_BLOB, MODEL_CACHED (sha256s of the models with room on the cache disk)
# shellcheck disable=SC2034  # read by plan.sh
ROOT_MODE=ram ROOT_BLOB="" MODEL_CACHED="" VERITY_ERRORS=0 CACHE_DIR=/run/builder/cache
# shellcheck disable=SC1091  # written by the initramfs
. /run/builder/root.env
set -a
# shellcheck disable=SC1091
[ -f /usr/lib/builder/image.env ] && . /usr/lib/builder/image.env
set +a
# llama.cpp's programs write through C stdio: line-buffered on a pipe too, as on the console (coreutils' stdbuf)
LINEBUF=()
command -v stdbuf >/dev/null && LINEBUF=(stdbuf -oL -eL)
lines=()
[ -f /run/builder/plan ] && mapfile -t lines </run/builder/plan

# The plan's line of KIND (and SERVICE) into `fields`; false when there is none.
plan_line() {
    local line
    for line in "${lines[@]}"; do
        IFS=$'\t' read -r -a fields <<<"$line"
        [ "${fields[0]:-}" = "$1" ] && { [ -z "${2:-}" ] || [ "${fields[1]:-}" = "$2" ]; } && return 0
    done
    return 1
}

# The node's environment (its `env` in the cluster file), for the process about to start; values stay unsaid.
plan_env() {
    local line fields
    for line in "${lines[@]}"; do
        IFS=$'\t' read -r -a fields <<<"$line"
        [ "${fields[0]:-}" = env ] || continue
        [ "${fields[2]:-}" = - ] && fields[2]=""
        export "${fields[1]}=${fields[2]:-}"
    done
    if plan_line agent && perl -MIO::Socket::IP -MIO::Select -e 1 2>/dev/null; then AGENT_PORT=${fields[1]}; fi
}

# SERVICE-ROLE (a unit's instance) into service, role and kind (the plan line's first field), and its line.
instance() {
    case "$1" in
        *-rpc-worker) service=${1%-rpc-worker} role=rpc-worker kind=rpc-worker ;;
        *-pipeline-worker) service=${1%-pipeline-worker} role=pipeline-worker kind=vllm ;;
        *-server) service=${1%-server} role=server kind=server ;;
        *) say "no process $1 (SERVICE-ROLE)"; exit 2 ;;
    esac
    plan_line "$kind" "$service" || { [ "$kind" = server ] && kind=vllm && plan_line vllm "$service"; } ||
        { say "the plan runs no $role of $service"; exit 2; }
}

setup() {
    cp /run/builder/resolv.conf /etc/resolv.conf 2>/dev/null || true
    hostname "$name"
    echo "$name" >/etc/hostname
    echo "$NODE_IP $name" >>/etc/hosts
    # the users the packages' maintainer scripts would add (sysusers.d: journal gateway, sshd on newer suites)
    systemd-sysusers >/dev/null 2>&1 || say "systemd-sysusers failed"
    grep -q '^sshd:' /etc/passwd || echo 'sshd:x:64999:65534::/run/sshd:/usr/sbin/nologin' >>/etc/passwd
    # the journal's HTTP server on the node's own address only (never a wildcard), started with the plan
    [[ $NODE_IP =~ ^[0-9.]+$ ]] || { say "the leased address $NODE_IP is not IPv4: no journal server"; return 0; }
    mkdir -p /run/systemd/system/systemd-journal-gatewayd.socket.d
    printf '[Socket]\nListenStream=\nListenStream=%s:19531\nFreeBind=yes\n' "$NODE_IP" \
        >/run/systemd/system/systemd-journal-gatewayd.socket.d/builder.conf
    if [ -s /usr/lib/builder/modules.load ]; then
        while read -r module; do
            loaded=${module%.ko}
            [ -d "/sys/module/${loaded//-/_}" ] && continue  # already loaded by the initramfs
            "$bb" insmod "/lib/modules/$module" 2>/dev/null || say "could not load ${module##*/}"
        done </usr/lib/builder/modules.load
    fi
    say_memory
}

# Each line of the plan becomes a unit: each server's unit after the qualification, a split head's after the node's
# own RPC workers too (systemd's After=, a drop-in written here: names checked by the cluster file, in plain
# characters); then every unit is started without waiting: systemd starts them in that order.
start_plan() {
    local units=() workers=() servers=() unit bytes
    # SERVICE -> bytes (its memory line): each of its units' MemoryMax=; a unit -> its SERVICE; the split heads
    local -A memory=() service_of=() head=()
    if [ -z "$plan" ] || [ -z "$plan_sha256" ]; then
        say "no builder.plan= and builder.plan_sha256= on the kernel command line: nothing to run (publish the node again)"
        return 0
    fi
    fetch_plan
    mapfile -t lines </run/builder/plan
    for line in "${lines[@]}"; do
        IFS=$'\t' read -r -a fields <<<"$line"
        unit=""
        case "${fields[0]:-}" in
            env) say "environment: ${fields[1]} set" ;;
            agent) units+=(builder-agent.service) ;;
            ssh) units+=(builder-sshd.service) ;;
            metrics) units+=(builder-metrics.service) ;;
            memory) [[ ${fields[2]} =~ ^[0-9]+$ ]] && memory[${fields[1]}]=${fields[2]} ;;
            rpc-worker) unit=builder-process@${fields[1]}-rpc-worker.service workers+=("$unit") ;;
            server) unit=builder-process@${fields[1]}-server.service servers+=("$unit")
                    [ "${fields[5]:-}" != - ] && head[$unit]=1 ;;
            vllm) if [ "${fields[2]}" = - ]; then unit=builder-process@${fields[1]}-pipeline-worker.service
                  else unit=builder-process@${fields[1]}-server.service; fi
                  servers+=("$unit") ;;
        esac
        if [ -n "$unit" ]; then
            [[ $unit =~ ^builder-process@[A-Za-z0-9][A-Za-z0-9._-]*\.service$ ]] || { say "bad service name in the plan"; exit 1; }
            units+=("$unit") service_of[$unit]=${fields[1]}
        fi
    done
    for unit in "${workers[@]}" "${servers[@]}"; do
        mkdir -p "/run/systemd/system/$unit.d"
        {
            if [[ $unit != *-rpc-worker.service ]]; then
                printf '[Unit]\nWants=builder-qualify.service\nAfter=builder-qualify.service'
                # a split's head (a server with --rpc) after the node's RPC workers
                [ -n "${head[$unit]:-}" ] && printf ' %s' "${workers[@]}"
                printf '\n'
            fi
            bytes=${memory[${service_of[$unit]}]:-}
            [ -n "$bytes" ] && printf '[Service]\nMemoryMax=%s\n' "$bytes"
        } >"/run/systemd/system/$unit.d/builder.conf"
    done
    systemctl daemon-reload
    [ -f /run/systemd/system/systemd-journal-gatewayd.socket.d/builder.conf ] &&
        units+=(systemd-journal-gatewayd.socket)
    say "$name runs ${#servers[@]} server(s) and ${#workers[@]} RPC worker(s)"
    [ ${#servers[@]} -gt 0 ] && printf '%s\n' builder-qualify.service >/run/builder/units.list &&
        node_state qualify pending
    printf '%s\n' builder-dhcp.service "${units[@]}" >>/run/builder/units.list
    [ ${#units[@]} -eq 0 ] || systemctl start --no-block -- "${units[@]}"
}

# One process of the plan: its device checked (a degraded RPC worker waits for it; a degraded server starts but
# its agent says down), its model fetched and checked, then exec'd on the node's own address.
process() {
    local path args device device_why port
    instance "$1"
    plan_env
    port=${fields[2]}
    check_device
    if [ "$kind" != vllm ] && [ "$device" = degraded ] && { [ "$role" = rpc-worker ] || [ -z "$AGENT_PORT" ]; }; then
        agent_state "$port" "down #degraded: $device_why"
        hold_degraded "$name $role $service"
    fi
    mkdir -p /run/builder/units
    case "$device" in
        ready) agent_state "$port" up; echo "ready on|" >"/run/builder/units/$1" ;;
        fallback) agent_state "$port" up; echo "ready on|(fallback: $device_why)" >"/run/builder/units/$1" ;;
        degraded)
            agent_state "$port" "down #degraded: $device_why"
            say_error "$name $role $service degraded: $device_why"
            echo "answers on|(degraded: out of the gateway's rotation)" >"/run/builder/units/$1"
            ;;
    esac
    if [ "$kind" = rpc-worker ]; then
        rpc_cache
        args=(--host "$RPC_IP" --port "$port")
        if [ -n "${fields[3]:-}" ] && [ "$ROOT_MODE" = cache ] && [[ " $MODEL_CACHED " == *" ${fields[4]} "* ]]; then
            # preseed: the model, kept on the cache disk, fills the worker's tensor cache (also there) first
            until path=$(fetch_model "${fields[3]}" "${fields[4]}"); do sleep 10; done
            args+=(--seed "$path")
        elif [ -n "${fields[3]:-}" ]; then
            say "the worker of $service is not preseeded: no room for its model on a cache disk (its head sends" \
                "the large tensors)"
        fi
        exec "${LINEBUF[@]}" /usr/local/bin/llama-entrypoint rpc-worker "${args[@]}"
    fi
    until path=$(fetch_model "${fields[3]}" "${fields[4]}"); do
        say "no model for $service: trying again in 10 s"
        sleep 10
    done
    if [ "$kind" = server ]; then
        args=(--model "$path" --host "$NODE_IP" --port "$port" --alias "$service" --metrics)
        [ "${fields[5]}" != - ] && args+=(--rpc "${fields[5]}" -ngl 999)
        [ "${fields[6]}" != - ] && args+=(-c "${fields[6]}")
        exec "${LINEBUF[@]}" /usr/local/bin/llama-entrypoint server "${args[@]}" "${fields[@]:7}"
    fi
    # vLLM: SERVICE PORT MODEL-URL SHA256 MOUNT ENV ARGV…; the model's squashfs mounted read-only at MOUNT
    local mount=${fields[5]} env=${fields[6]} pair pairs=()
    if ! grep -q " $mount squashfs " /proc/mounts; then
        mkdir -p "$mount"
        "$bb" mount -t squashfs -o ro,loop "$path" "$mount" || { say "the model ${path##*/} does not mount"; exit 1; }
    fi
    say "starting vLLM: $service from ${path##*/}"
    [ "$env" != - ] && IFS=, read -r -a pairs <<<"$env"
    # a pipeline's nodes are all on the data network or none (builder/cluster/model.py checks)
    export GLOO_SOCKET_IFNAME="${DATA_IFACE:-$NODE_IFACE}" NCCL_SOCKET_IFNAME="${DATA_IFACE:-$NODE_IFACE}"
    for pair in "${pairs[@]}"; do export "${pair?}"; done
    export PYTHONUNBUFFERED=1
    exec /usr/local/bin/vllm-entrypoint "${fields[@]:7}"
}

# ExecStartPost: the unit is active once its process answers; its `ready on` line then (MAINPID: the process).
ready() {
    # shellcheck disable=SC2034  # child: read by await_ready (plan.sh)
    local verb="ready on" note="" child=${MAINPID:-} tries=2400
    instance "$1"
    # the process says how it runs (ready, fallback, degraded) once its device is checked
    until [ -f "/run/builder/units/$1" ]; do
        tries=$((tries - 1))
        { [ "$tries" -gt 0 ] && kill -0 "$child"; } 2>/dev/null || return 1
        sleep 0.5
    done
    IFS='|' read -r verb note <"/run/builder/units/$1"
    if [ "$role" = pipeline-worker ]; then
        say "$name pipeline-worker $service started"
    elif [ "$kind" = vllm ]; then
        await_ready 14400 "$name server $service" server "${fields[2]}"  # vLLM: minutes on a slow CPU
    elif [ "$role" = rpc-worker ]; then
        # a worker serves whichever head connects: "(for SERVICE)"
        await_ready 1200 "$name $role" "$role" "${fields[2]}" "(for $service)${note:+ $note}"
    else
        await_ready 1200 "$name $role $service" "$role" "${fields[2]}" "$note" "$verb"
    fi
}

stopped() {
    instance "$1"
    rm -f "/run/builder/units/$1"
    local line="$role $service exited (${SERVICE_RESULT:-}: ${EXIT_CODE:-} ${EXIT_STATUS:-}); systemd restarts it"
    # a stop asked for (systemctl stop, a reboot) is no error
    if [ "${SERVICE_RESULT:-success}" = success ]; then say "$line"; else say_error "$line"; fi
    check_root
}

# The qualification's result is kept for the agent's `state` answer: qualified, unqualified or failed (the
# device missing, or the run failing), the device it ran on and why (pending until it has run).
qualify() {
    local report code device why
    report=$(/usr/local/bin/llama-entrypoint qualify 2>/dev/null)
    code=$?
    device=$(json_field device "$report") why=$(json_field why "$report")
    node_state qualify_device "$device"
    node_state qualify_why "$why"
    case "$code" in
        0) node_state qualify qualified
           say "$name qualified on $device: $why" ;;
        3) node_state qualify unqualified
           say_error "$name unqualified: $why; ids [$(json_field ids "$report" list)]," \
            "recorded [$(json_field recorded "$report" list)] (a report: the node keeps serving)" ;;
        *) node_state qualify failed
           say_error "$name not qualified: $why (exit $code)" ;;
    esac
    return "$code"
}

case "${1:-}" in
    setup) setup ;;
    dhcp)
        # the lease is renewed for as long as the node runs; its event script keeps the address the node holds
        say "DHCP: the lease of $NODE_IP on $NODE_IFACE is renewed for as long as the node runs"
        exec "$bb" udhcpc -f -i "$NODE_IFACE" -r "$NODE_IP" -t 5 -T 3 -A 20 -s /usr/lib/builder/udhcpc.sh ;;
    plan) start_plan ;;
    process) process "$2" ;;
    ready) ready "$2" ;;
    stopped) stopped "$2" ;;
    qualify) qualify ;;
    agent)
        plan_line agent || exit 0
        mkdir -p /run/builder/agent
        if ! perl -MIO::Socket::IP -MIO::Select -e 1 2>/dev/null; then
            say "no gateway agent: this root has no perl with IO::Socket::IP; a degraded server is not started"
            exec sleep infinity
        fi
        say "gateway agent on $NODE_IP:${fields[1]}"
        exec perl -e "$AGENT_SCRIPT" "$NODE_IP" "${fields[1]}" /run/builder/agent /run/builder/state \
            "${NODE_CMDLINE:-/proc/cmdline}" /usr/lib/builder/image.digest ;;
    sshd)
        plan_line ssh || exit 0
        port=${fields[1]} state=/run/builder/ssh/host
        mkdir -p /run/builder/ssh
        chmod 0755 /run/builder/ssh
        for line in "${lines[@]}"; do
            IFS=$'\t' read -r -a fields <<<"$line"
            [ "${fields[0]:-}" = admin-key ] && printf '%s %s\n' "${fields[1]}" "${fields[2]}"
        done >/run/builder/ssh/authorized_keys.part
        chmod 0600 /run/builder/ssh/authorized_keys.part
        mv /run/builder/ssh/authorized_keys.part /run/builder/ssh/authorized_keys
        if [ "$ROOT_MODE" = cache ]; then
            state=$CACHE_DIR/ssh
            say "ssh host key kept on the cache disk"
        else
            say "ssh host key made for this boot (no cache disk)"
        fi
        exec /usr/lib/builder/sshd "$NODE_IP" "$port" "$state" ;;
    metrics)
        plan_line metrics || exit 0
        exec /usr/lib/builder/metrics "$NODE_IP" "${fields[1]}" ;;
    *) echo "usage: node setup|dhcp|plan|process S-R|ready S-R|stopped S-R|qualify|agent|sshd|metrics" >&2; exit 2 ;;
esac
