# shellcheck shell=bash
# The plan executor of a netbooted node, sourced by node-init (PID 1) once the node is up: `run_plan` fetches the
# node's plan (builder.plan=URL, checked against builder.plan_sha256), exports its env lines and starts every
# process it names, each kept running on its own (builder/netboot/plan.py writes the plan and documents its
# lines). What it needs from the one that sources it: `say`; `name` (the node's), `plan` and `plan_sha256`;
# `bb` (a busybox with wget, mount, dmesg, grep and reboot); NODE_IP and NODE_IFACE (the leased address and its
# interface); ROOT_MODE, ROOT_BLOB, MODEL_CACHED, VERITY_ERRORS and CACHE_DIR (from the initramfs).
# shellcheck disable=SC2154  # the variables above are set by node-init

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

# Ready means the process ($1: its role) on port $2 answers: a TCP connection for a worker, /health saying ok
# for a server.
is_ready() {
    if [ "$1" != rpc-worker ]; then
        exec 3<>"/dev/tcp/$NODE_IP/$2" || return 1
        printf 'GET /health HTTP/1.0\r\nHost: %s\r\n\r\n' "$NODE_IP" >&3
        local status
        read -r _ status _ <&3
        exec 3<&-
        [ "$status" = 200 ]
    else
        (exec 3<>"/dev/tcp/$NODE_IP/$2") 2>/dev/null
    fi
}

# Poll every half second, at most TRIES times, until ROLE on PORT answers (then print "LABEL ready on ADDRESS:PORT"
# and NOTE, and the node's memory) or the process $child has exited.
await_ready() {
    local tries=$1 label=$2 role=$3 port=$4 note=${5:-}
    for _ in $(seq 1 "$tries"); do
        if is_ready "$role" "$port" 2>/dev/null; then
            say "$label ready on $NODE_IP:$port${note:+ $note}"
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

# One process of the plan, kept running: ROLE SERVICE PORT [MODEL-PATH RPC CTX ARGS...] ('-': none). It prints
# its ready line once it answers and is restarted 5 s after it exits; every llama-server gets --metrics and the
# service's name as its alias, as `builder cluster up --local` runs them.
supervise() {
    local role=$1 service=$2 port=$3 path=${4:--} rpc=${5:--} ctx=${6:--} child args
    shift 6
    while :; do
        if [ "$role" = rpc-worker ]; then
            /usr/local/bin/llama-entrypoint rpc-worker --host "$NODE_IP" --port "$port" &
        else
            args=(--model "$path" --host "$NODE_IP" --port "$port" --alias "$service" --metrics)
            [ "$rpc" != - ] && args+=(--rpc "$rpc" -ngl 999)
            [ "$ctx" != - ] && args+=(-c "$ctx")
            /usr/local/bin/llama-entrypoint server "${args[@]}" "$@" &
        fi
        child=$!
        # a server says its service (clients ask for it by name); a worker serves whichever head connects
        if [ "$role" = rpc-worker ]; then
            await_ready 1200 "$name $role" "$role" "$port" "(for $service)"
        else
            await_ready 1200 "$name $role $service" "$role" "$port"
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
    local service=$1 port=$2 path=$3 mount=$4 env=$5 child pair pairs=()
    shift 5
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
            export GLOO_SOCKET_IFNAME="$NODE_IFACE" NCCL_SOCKET_IFNAME="$NODE_IFACE"
            for pair in "${pairs[@]}"; do export "${pair?}"; done
            exec /usr/local/bin/vllm-entrypoint "$@"
        ) &
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
        [ "${fields[0]:-}" = rpc-worker ] || continue
        [ "$workers" = 0 ] && rpc_cache
        workers=$((workers + 1))
        supervise rpc-worker "${fields[1]}" "${fields[2]}" - - - &
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
