# shellcheck shell=bash
# The plan executor of a netbooted node, sourced by node-init (PID 1) once the node is up: `run_plan` fetches the
# node's plan (builder.plan=URL, checked against builder.plan_sha256), exports its env lines and starts every
# process it names, each kept running on its own (builder/netboot/plan.py writes the plan and documents its
# lines). What it needs from the one that sources it: `say`; `name` (the node's), `plan` and `plan_sha256`;
# `bb` (a busybox with wget, mount, dmesg, grep and reboot); NODE_IP and NODE_IFACE (the leased address and its
# interface); RPC_IP (where RPC workers listen: the data network's address, else NODE_IP) and DATA_IFACE (the data
# network's interface, or empty); ROOT_MODE, ROOT_BLOB, MODEL_CACHED, VERITY_ERRORS and CACHE_DIR (from the initramfs).
# shellcheck disable=SC2154  # the variables above are set by node-init

# --- logs: every process's output stays on the console and is kept in RAM, bounded ---

# /run/builder/logs holds node.log (the node's own `builder-node:` lines, and the output of its agent, ssh
# server and exporter) and SERVICE-ROLE.log per process of the plan (e.g. tiny-server.log, tiny-rpc-worker.log).
# Each file is moved aside to FILE.1 once it holds LOG_BYTES, so a process keeps at most twice that.
# `builder cluster logs FILE NODE [SERVICE]` reads them over ssh (builder/cluster/nodelogs.py). node-init makes
# the folder once it has sourced this file.
LOG_DIR=/run/builder/logs LOG_BYTES=1048576
NODE_LOG=$LOG_DIR/node.log
IN_LOG=""  # set in a subshell whose output keep_log copies to the node log: say then leaves the copy to it

# Append the line $1 to the node log (several processes write it: its size is read each time).
node_log() {
    local size
    printf '%s\n' "$1" >>"$NODE_LOG" 2>/dev/null || return 0
    size=$("$bb" stat -c %s "$NODE_LOG" 2>/dev/null) || return 0
    [ "$size" -lt "$LOG_BYTES" ] || mv -f "$NODE_LOG" "$NODE_LOG.1"
}

# Copy stdin, line by line, to stdout (the console) and to the log $1 (a line longer than 4096 bytes is cut in
# pieces); `builder-node:` lines also reach the node log. The one reader of a process's output: it ends with it.
keep_log() {
    local file=$1 line size=0 LC_ALL=C
    [ -f "$file" ] && size=$("$bb" stat -c %s "$file" 2>/dev/null)
    while IFS= read -r -n 4096 line || [ -n "$line" ]; do
        line=${line%$'\r'}  # sshd -e ends its lines with CR LF
        printf '%s\n' "$line"
        if [ "$file" = "$NODE_LOG" ] || [[ $line == "builder-node: "* ]]; then
            node_log "$line"
            [ "$file" = "$NODE_LOG" ] && continue
        fi
        printf '%s\n' "$line" >>"$file"
        size=$((size + ${#line} + 1))
        if [ "$size" -ge "$LOG_BYTES" ]; then
            mv -f "$file" "$file.1"
            size=0
        fi
    done 2>/dev/null
}

# llama.cpp's programs write through C stdio: line-buffered on a pipe too, as on the console (coreutils' stdbuf)
LINEBUF=()
command -v stdbuf >/dev/null && LINEBUF=(stdbuf -oL -eL)

# The model at URL $1 goes to the overlay's tmpfs; one published on the control node comes with its sha256 ($2)
# and, on a node with a cache disk that has room for it (the initramfs made the room), is kept there by it.
fetch_model() {
    local model=$1 model_sha256=$2
    local dest=/var/cache/llama.cpp/models/${model##*/} attempt got
    if [ -n "$model_sha256" ] && [[ " $MODEL_CACHED " == *" $model_sha256 "* ]]; then
        dest=$CACHE_DIR/blobs/sha256/$model_sha256
        if [ -f "$dest" ]; then
            # No dm-verity for a model: hash it (a local read) before serving from it
            got=$(sha256sum "$dest") && got=${got%% *}
            if [ "$got" = "$model_sha256" ]; then
                touch "$dest"
                say "model from the cache: sha256 $got (no download)" >&2
                echo "$dest"
                return 0
            fi
            say "cached model sha256 mismatch (got $got): dropping it and fetching it again" >&2
            rm -f "$dest"
        fi
    fi
    mkdir -p "${dest%/*}"
    for attempt in 1 2 3 4 5; do
        if "$bb" wget -q -O "$dest.part" "$model"; then
            got=$(sha256sum "$dest.part") && got=${got%% *}
            if [ -z "$model_sha256" ] || [ "$got" = "$model_sha256" ]; then
                mv "$dest.part" "$dest"
                sync  # on the cache disk, the model survives a power cut from here on
                [ -n "$model_sha256" ] && say "model verified: sha256 $got" >&2
                echo "$dest"
                return 0
            fi
            say "model sha256 mismatch: got $got, expected $model_sha256 (attempt $attempt of 5)" >&2
            rm -f "$dest.part"
        else
            say "download of $model failed (attempt $attempt of 5)" >&2
        fi
        sleep $((attempt * 2))
    done
    return 1
}

# What the node has left for models once it is up (the benchmark reads this line).
say_memory() {
    local key value available="" total=""
    while read -r key value _; do
        case "$key" in
            MemTotal:) total=$value ;;
            MemAvailable:) available=$value ;;
        esac
    done </proc/meminfo
    say "memory: MemAvailable $available kB of MemTotal $total kB"
}

# dm-verity fails the read of a corrupted block of the root (the kernel logs it); a cached root with one is
# dropped from the cache disk and the node reboots to fetch it again.
check_root() {
    [ "$("$bb" dmesg | "$bb" grep -c 'verity.*corrupted')" -gt "$VERITY_ERRORS" ] || return 0
    if [ "$ROOT_MODE" = cache ]; then
        say "the cached root image failed dm-verity while running: dropping ${ROOT_BLOB##*/} and rebooting to fetch it"
        rm -f "$ROOT_BLOB"
        sync
        "$bb" reboot -f
    fi
    say "the root image failed dm-verity while running: rebooting to fetch it again"
    "$bb" reboot -f
}

# ggml-rpc-server's tensor cache (-c) survives reboots on the cache disk.
rpc_cache() {
    [ "$ROOT_MODE" = cache ] || return 0
    mkdir -p "$CACHE_DIR/rpc" /var/cache/llama.cpp/rpc
    mount --bind "$CACHE_DIR/rpc" /var/cache/llama.cpp/rpc &&
        say "RPC tensor cache on the cache disk ($(find "$CACHE_DIR/rpc" -type f | wc -l) files kept)"
}

# Ready means the process ($1: its role) on port $2 answers: a TCP connection for a worker (on RPC_IP), /health
# saying ok for a server.
is_ready() {
    if [ "$1" != rpc-worker ]; then
        exec 3<>"/dev/tcp/$NODE_IP/$2" || return 1
        printf 'GET /health HTTP/1.0\r\nHost: %s\r\n\r\n' "$NODE_IP" >&3
        local status
        read -r _ status _ <&3
        exec 3<&-
        [ "$status" = 200 ]
    else
        (exec 3<>"/dev/tcp/$RPC_IP/$2") 2>/dev/null
    fi
}

# Poll every half second, at most TRIES times, until ROLE on PORT answers (then print "LABEL ready on ADDRESS:PORT"
# and NOTE, "answers on" instead of "ready on" with VERB, and the node's memory) or the process $child has exited.
await_ready() {
    local tries=$1 label=$2 role=$3 port=$4 note=${5:-} verb=${6:-ready on} address=$NODE_IP
    [ "$role" = rpc-worker ] && address=$RPC_IP
    for _ in $(seq 1 "$tries"); do
        if is_ready "$role" "$port" 2>/dev/null; then
            say "$label $verb $address:$port${note:+ $note}"
            say_memory
            return 0
        fi
        kill -0 "$child" 2>/dev/null || return 1
        sleep 0.5
    done
    return 1
}

# The node's plan, downloaded from the control node and checked against its sha256 (retried until it comes).
fetch_plan() {
    local attempt=1 got
    while :; do
        if "$bb" wget -q -O /run/builder/plan.part "$plan"; then
            got=$(sha256sum /run/builder/plan.part) && got=${got%% *}
            if [ "$got" = "$plan_sha256" ]; then
                mv /run/builder/plan.part /run/builder/plan
                say "node plan verified: sha256 $got"
                return 0
            fi
            say "node plan sha256 mismatch: got $got, expected $plan_sha256 (attempt $attempt)"
        else
            say "download of the node plan failed (attempt $attempt)"
        fi
        rm -f /run/builder/plan.part
        sleep $((attempt < 5 ? attempt * 2 : 10))
        attempt=$((attempt + 1))
    done
}

# --- ready means right: the device, the gateway's agent, the qualification ---

# The string field NAME of the one JSON line $2 (llama-entrypoint's check-device and qualify), unescaped, on
# one line; the list field with `list`.
json_field() {
    local value
    if [ "${3:-}" = list ]; then
        [[ $2 =~ \"$1\":\ \[([^]]*)\] ]] && echo "${BASH_REMATCH[1]}"
        return 0
    fi
    [[ $2 =~ \"$1\":\ \"(([^\"\\]|\\.)*)\" ]] || return 0
    value=${BASH_REMATCH[1]}
    value=${value//\\n/ } value=${value//\\t/ } value=${value//\\r/}
    value=${value//\\\"/\"}
    echo "${value//\\\\/\\}"
}

# Does the image list the device it is built for? Sets device (ready, degraded or fallback: degraded, and the
# node's env allows serving on what llama.cpp lists) and device_why (check-device's why, one line).
check_device() {
    local report
    report=$(/usr/local/bin/llama-entrypoint check-device 2>/dev/null)
    device_why=$(json_field why "$report")
    if [ "$(json_field state "$report")" = ready ]; then
        device=ready
    elif [ "${LLAMA_ALLOW_FALLBACK:-0}" = 1 ]; then
        device=fallback
    else
        device=degraded
        [ -n "$device_why" ] || device_why="check-device gave no answer: ${report:-nothing}"
    fi
}

# What the gateway's agent-check reads for the server on port $1: up, or down with a reason ($2...).
agent_state() {
    local port=$1
    shift
    [ -n "$AGENT_PORT" ] || return 0
    printf '%s\n' "$*" | tr -d '\000-\011\013-\037' >"/run/builder/agent/$port.part"
    mv "/run/builder/agent/$port.part" "/run/builder/agent/$port"
}

# HAProxy's agent-check protocol: the gateway connects to the node's agent port, sends the port of the server
# it checks and a newline (its agent-send), and reads one line: `up`, or `down #reason` (the server leaves the
# rotation while its /health check may still pass). Perl's core sockets (perl-base, in every Debian and Ubuntu
# root) listen on the node's own address only; busybox's nc would listen on every address.
# shellcheck disable=SC2016  # perl's own variables
AGENT_SCRIPT='
use strict; use warnings; use IO::Socket::IP; use IO::Select;
my ($addr, $port, $dir) = @ARGV;
$SIG{PIPE} = "IGNORE";
my $listen = IO::Socket::IP->new(LocalHost => $addr, LocalPort => $port, Listen => 16, ReuseAddr => 1)
    or die "cannot listen on $addr:$port: $@\n";
while (1) {
    my $client = $listen->accept or next;
    my ($asked, $buffer) = ("", "");
    my $ready = IO::Select->new($client);
    while ($asked !~ /\n/ && length($asked) < 16 && $ready->can_read(2)) {
        sysread($client, $buffer, 16) or last;
        $asked .= $buffer;
    }
    my $answer = "down #the agent takes a port number and a newline\n";
    if ($asked =~ /\Assh\r?\n/) {
        # the node ssh host key (public): builder cluster status shows it, cluster reboot checks it
        $answer = "none #no ssh server\n";
        if (open(my $key, "<", "/run/builder/ssh/host_key.pub")) {
            my $line = <$key>;
            close $key;
            $answer = "$1 $2\n" if defined $line && $line =~ /\A([a-z0-9@.-]{1,64}) ([A-Za-z0-9+\/]+={0,2})[ \n]/;
        }
    } elsif ($asked =~ /\A([0-9]{1,5})\r?\n/) {
        $answer = "down #no server on port $1\n";
        if (open(my $state, "<", "$dir/$1")) {
            my $line = <$state>;
            close $state;
            $answer = $line if defined $line && $line =~ /\n\z/;
        }
    }
    syswrite($client, $answer);
    close $client;
}'
AGENT_PORT=""

# The node's agent on its address and port $1 (restarted if it exits); without perl there is none, and a
# degraded server is then not started at all (its /health check fails: the gateway says DOWN).
start_agent() {
    mkdir -p /run/builder/agent
    if ! perl -MIO::Socket::IP -MIO::Select -e 1 2>/dev/null; then
        say "no gateway agent on port $1: this root has no perl with IO::Socket::IP; a degraded server is not started"
        return 0
    fi
    AGENT_PORT=$1
    (
        # shellcheck disable=SC2034  # read by say (node-init)
        IN_LOG=1
        while :; do
            perl -e "$AGENT_SCRIPT" "$NODE_IP" "$AGENT_PORT" /run/builder/agent
            say "gateway agent exited with status $?; restarting in 5 s"
            sleep 5
        done
    ) > >(keep_log "$NODE_LOG") 2>&1 &
    say "gateway agent on $NODE_IP:$AGENT_PORT"
}

# The node's ssh server (a cluster file's admins:) on its address and port $1, restarted if it exits: root's
# authorized keys are the plan's admin-key lines (public keys), the host key is made on the node by sshd.sh
# and kept on the cache disk when the node has one (else made again every boot).
start_ssh() {
    local port=$1 state=/run/builder/ssh/host line fields
    if ! [ -x /usr/sbin/sshd ]; then
        say "no ssh server on port $port: this root has none (pxe build adds it from the pinned .debs)"
        return 0
    fi
    mkdir -p /run/builder/ssh
    chmod 0755 /run/builder/ssh
    : >/run/builder/ssh/authorized_keys.part
    for line in "${lines[@]}"; do
        IFS=$'\t' read -r -a fields <<<"$line"
        [ "${fields[0]:-}" = admin-key ] && printf '%s %s\n' "${fields[1]}" "${fields[2]}" >>/run/builder/ssh/authorized_keys.part
    done
    chmod 0600 /run/builder/ssh/authorized_keys.part
    mv /run/builder/ssh/authorized_keys.part /run/builder/ssh/authorized_keys
    # sshd's privilege separation user (the package's maintainer scripts, which never ran, would add it)
    grep -q '^sshd:' /etc/passwd || useradd --system --no-create-home --home-dir /run/sshd \
        --shell /usr/sbin/nologin sshd 2>/dev/null || echo 'sshd:x:64999:65534::/run/sshd:/usr/sbin/nologin' >>/etc/passwd
    if [ "$ROOT_MODE" = cache ]; then
        state=$CACHE_DIR/ssh
        say "ssh host key kept on the cache disk"
    else
        say "ssh host key made for this boot (no cache disk)"
    fi
    (
        # shellcheck disable=SC2034  # read by say (node-init)
        IN_LOG=1
        while :; do
            /usr/lib/builder/sshd "$NODE_IP" "$port" "$state"
            say "ssh server exited with status $?; restarting in 5 s"
            sleep 5
        done
    ) > >(keep_log "$NODE_LOG") 2>&1 &
}

# The node's metrics exporter (a cluster file's admins:) on its address and port $1, restarted if it exits.
start_metrics() {
    local port=$1
    if ! [ -x /usr/bin/prometheus-node-exporter ]; then
        say "no metrics on port $port: this root has no exporter (pxe build adds it from the pinned .debs)"
        return 0
    fi
    (
        # shellcheck disable=SC2034  # read by say (node-init)
        IN_LOG=1
        while :; do
            /usr/lib/builder/metrics "$NODE_IP" "$port"
            say "metrics exporter exited with status $?; restarting in 5 s"
            sleep 5
        done
    ) > >(keep_log "$NODE_LOG") 2>&1 &
}

# The qualification, once per boot (the node runs one image): in the background, after the first process is up.
qualify_once() {
    mkdir /run/builder/qualify 2>/dev/null || return 0
    (
        local report code
        report=$(/usr/local/bin/llama-entrypoint qualify 2>/dev/null)
        code=$?
        case "$code" in
            0) say "$name qualified on $(json_field device "$report"): $(json_field why "$report")" ;;
            3) say "$name unqualified: $(json_field why "$report"); ids [$(json_field ids "$report" list)]," \
                "recorded [$(json_field recorded "$report" list)] (a report: the node keeps serving)" ;;
            *) say "$name not qualified: $(json_field why "$report" || true) (exit $code)" ;;
        esac
    ) &
}

# Hold a process whose device is missing: re-check every DEVICE_RECHECK seconds, saying so again only when the
# reason changes, until the device is there (or the node's env allows the fallback).
hold_degraded() {
    local label=$1 said=""
    while [ "$device" = degraded ]; do
        if [ "$device_why" != "$said" ]; then
            say "$label degraded: $device_why"
            said=$device_why
        fi
        sleep "${DEVICE_RECHECK:-60}"
        check_device
    done
}

# One process of the plan, kept running: ROLE SERVICE PORT [MODEL-PATH RPC CTX ARGS...] ('-': none; a worker's
# MODEL-PATH is the GGUF it fills its tensor cache from before it listens). It prints
# its ready line once it answers and is restarted 5 s after it exits; every llama-server gets --metrics and the
# service's name as its alias, as `builder cluster up --local` runs them. Before each start the device is
# checked (check-device): a degraded RPC worker is not started (its head cannot use it), a degraded server is
# started but its agent says down (out of the gateway's rotation), unless LLAMA_ALLOW_FALLBACK=1.
supervise() {
    local role=$1 service=$2 port=$3 path=${4:--} rpc=${5:--} ctx=${6:--} child args label note verb device device_why
    local log=$LOG_DIR/$service-$role.log
    shift 6
    label="$name $role $service"
    while :; do
        check_device
        if [ "$device" = degraded ] && { [ "$role" = rpc-worker ] || [ -z "$AGENT_PORT" ]; }; then
            agent_state "$port" "down #degraded: $device_why"
            hold_degraded "$label"
        fi
        note="" verb="ready on"
        case "$device" in
            ready) agent_state "$port" up ;;
            fallback) agent_state "$port" up; note="(fallback: $device_why)" ;;
            degraded)
                agent_state "$port" "down #degraded: $device_why"
                say "$label degraded: $device_why"
                verb="answers on" note="(degraded: out of the gateway's rotation)"
                ;;
        esac
        if [ "$role" = rpc-worker ] && [ "$path" != - ]; then
            "${LINEBUF[@]}" /usr/local/bin/llama-entrypoint rpc-worker --host "$RPC_IP" --port "$port" \
                --seed "$path" > >(keep_log "$log") 2>&1 &
        elif [ "$role" = rpc-worker ]; then
            "${LINEBUF[@]}" /usr/local/bin/llama-entrypoint rpc-worker --host "$RPC_IP" --port "$port" \
                > >(keep_log "$log") 2>&1 &
        else
            args=(--model "$path" --host "$NODE_IP" --port "$port" --alias "$service" --metrics)
            [ "$rpc" != - ] && args+=(--rpc "$rpc" -ngl 999)
            [ "$ctx" != - ] && args+=(-c "$ctx")
            "${LINEBUF[@]}" /usr/local/bin/llama-entrypoint server "${args[@]}" "$@" > >(keep_log "$log") 2>&1 &
        fi
        child=$!
        # a server says its service (clients ask for it by name); a worker serves whichever head connects
        if [ "$role" = rpc-worker ]; then
            await_ready 1200 "$name $role" "$role" "$port" "(for $service)${note:+ $note}" && qualify_once
        else
            await_ready 1200 "$label" "$role" "$port" "$note" "$verb" && [ "$device" != degraded ] && qualify_once
        fi
        wait "$child"
        say "$role $service exited with status $?; restarting in 5 s"
        check_root
        sleep 5
    done
}

# One vLLM process of the plan, kept running: SERVICE PORT MODEL-PATH MOUNT ENV ARGV... The model is the squashfs
# of a Hugging Face folder (published by sha256, fetched and checked by fetch_model), mounted read-only at MOUNT
# (no unpacking); ARGV goes to the image's own entrypoint (`serve …`, the command line builder/cluster/vllm_service.py
# makes for every vLLM process), with ENV (NAME=VALUE,…) and the interface the node's address is on. PORT '-' is a
# pipeline node that serves no API: it is started, never probed.
supervise_vllm() {
    local service=$1 port=$2 path=$3 mount=$4 env=$5 child pair pairs=() log=$LOG_DIR/$1-server.log
    shift 5
    [ "$port" = - ] && log=$LOG_DIR/$service-pipeline-worker.log
    if ! grep -q " $mount squashfs " /proc/mounts; then
        mkdir -p "$mount"
        "$bb" mount -t squashfs -o ro,loop "$path" "$mount" || { say "the model ${path##*/} does not mount"; return 1; }
    fi
    # Python's multiprocessing (vLLM's engine process) needs a shared-memory folder
    grep -q " /dev/shm " /proc/mounts || { mkdir -p /dev/shm && "$bb" mount -t tmpfs -o mode=1777 shm /dev/shm; }
    [ "$env" != - ] && IFS=, read -r -a pairs <<<"$env"
    while :; do
        say "starting vLLM: $service from ${path##*/}"
        (
            # a pipeline's nodes are all on the data network or none (builder/cluster/model.py checks)
            export GLOO_SOCKET_IFNAME="${DATA_IFACE:-$NODE_IFACE}" NCCL_SOCKET_IFNAME="${DATA_IFACE:-$NODE_IFACE}"
            for pair in "${pairs[@]}"; do export "${pair?}"; done
            export PYTHONUNBUFFERED=1  # its output reaches the console as it comes, through keep_log
            exec /usr/local/bin/vllm-entrypoint "$@"
        ) > >(keep_log "$log") 2>&1 &
        child=$!
        if [ "$port" = - ]; then
            say "$name pipeline-worker $service started"
        else
            # vLLM imports torch and loads its kernels first: minutes on a slow CPU
            await_ready 14400 "$name server $service" server "$port"
        fi
        wait "$child"
        say "vllm $service exited with status $?; restarting in 5 s"
        check_root
        sleep 5
    done
}

# Follow the plan: RPC workers first (heads on other nodes wait for them), then each server once its model is
# here. PID 1 then only reaps: the supervisors run for as long as the node does.
run_plan() {
    local line fields path kind workers=0 servers=0
    local -A fetched=()  # model sha256 -> its path: two services of one model share one download
    fetch_plan
    mapfile -t lines </run/builder/plan
    # The node's environment (from its `env` in the cluster file), for every process it starts; the values
    # stay off the console.
    for line in "${lines[@]}"; do
        IFS=$'\t' read -r -a fields <<<"$line"
        [ "${fields[0]:-}" = env ] || continue
        [ "${fields[2]:-}" = - ] && fields[2]=""
        export "${fields[1]}=${fields[2]:-}"
        say "environment: ${fields[1]} set"
    done
    for line in "${lines[@]}"; do
        IFS=$'\t' read -r -a fields <<<"$line"
        [ "${fields[0]:-}" = agent ] && start_agent "${fields[1]}"
    done
    for line in "${lines[@]}"; do
        IFS=$'\t' read -r -a fields <<<"$line"
        [ "${fields[0]:-}" = ssh ] && start_ssh "${fields[1]}"
        [ "${fields[0]:-}" = metrics ] && start_metrics "${fields[1]}"
    done
    for line in "${lines[@]}"; do
        IFS=$'\t' read -r -a fields <<<"$line"
        [ "${fields[0]:-}" = rpc-worker ] || continue
        [ "$workers" = 0 ] && rpc_cache
        workers=$((workers + 1))
        if [ -n "${fields[3]:-}" ] && [ "$ROOT_MODE" = cache ] && [[ " $MODEL_CACHED " == *" ${fields[4]} "* ]]; then
            # preseed: the model, kept on the cache disk, fills the worker's tensor cache (also there) first
            (
                until path=$(fetch_model "${fields[3]}" "${fields[4]}"); do
                    say "no model for the worker of ${fields[1]}: trying again in 10 s"
                    sleep 10
                done
                supervise rpc-worker "${fields[1]}" "${fields[2]}" "$path" - -
            ) &
        else
            [ -n "${fields[3]:-}" ] && say "the worker of ${fields[1]} is not preseeded: no room for its model on" \
                "a cache disk (its head sends the large tensors)"
            supervise rpc-worker "${fields[1]}" "${fields[2]}" - - - &
        fi
    done
    for line in "${lines[@]}"; do
        IFS=$'\t' read -r -a fields <<<"$line"
        kind=${fields[0]:-}
        [ "$kind" = server ] || [ "$kind" = vllm ] || continue
        path=${fetched[${fields[4]}]:-}
        until [ -n "$path" ] || path=$(fetch_model "${fields[3]}" "${fields[4]}"); do
            say "no model for ${fields[1]}: trying again in 10 s"
            sleep 10
        done
        fetched[${fields[4]}]=$path
        servers=$((servers + 1))
        if [ "$kind" = vllm ]; then
            supervise_vllm "${fields[1]}" "${fields[2]}" "$path" "${fields[5]}" "${fields[6]}" "${fields[@]:7}" &
        else
            supervise server "${fields[1]}" "${fields[2]}" "$path" "${fields[5]}" "${fields[6]}" "${fields[@]:7}" &
        fi
    done
    say "$name runs $servers server(s) and $workers RPC worker(s)"
    while :; do
        wait
        sleep 1
    done
}
