#!/bin/bash
# PID 1 of a netbooted node, inside the image's root (read-only squashfs under a tmpfs overlay).
# It applies the hostname, loads the accelerator's modules, starts the node's role through the image's own
# entrypoint, prints a ready line on the console once the role accepts connections, and restarts the role
# if it exits. The role binds the node's own address, never a wildcard one.
set -u
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
bb=/usr/lib/builder/busybox

say() { echo "builder-node: $*"; }

name=node role=rpc-worker port="" rpc="" model="" model_sha256="" ctx="" served_name="" vllm_args="" vllm_kv=""
read -r -a words </proc/cmdline
for word in "${words[@]}"; do
    case "$word" in
        builder.name=*) name=${word#*=} ;;
        builder.role=*) role=${word#*=} ;;
        builder.port=*) port=${word#*=} ;;
        builder.rpc=*) rpc=${word#*=} ;;
        builder.model=*) model=${word#*=} ;;
        builder.model_sha256=*) model_sha256=${word#*=} ;;
        builder.ctx=*) ctx=${word#*=} ;;
        builder.served_name=*) served_name=${word#*=} ;;
        builder.vllm_args=*) vllm_args=${word#*=} ;;
        builder.vllm_kv=*) vllm_kv=${word#*=} ;;
    esac
done

# shellcheck disable=SC1091
. /run/builder/net.env
# ROOT_MODE (ram or cache), ROOT_BLOB, MODEL_CACHE (1: the model is kept on the cache disk), VERITY_ERRORS
ROOT_MODE=ram ROOT_BLOB="" MODEL_CACHE=0 VERITY_ERRORS=0 CACHE_DIR=/run/builder/cache
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

# The model goes to the overlay's tmpfs; one published on the control node comes with its sha256 and, on a
# node with a cache disk that has room for it (the initramfs made the room), is kept there by that sha256.
fetch_model() {
    local dest=/var/cache/llama.cpp/models/${model##*/} attempt got
    if [ -n "$model_sha256" ] && [ "$MODEL_CACHE" = 1 ]; then
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
if [ "$ROOT_MODE" = cache ] && [ "$role" = rpc-worker ]; then
    mkdir -p "$CACHE_DIR/rpc" /var/cache/llama.cpp/rpc
    mount --bind "$CACHE_DIR/rpc" /var/cache/llama.cpp/rpc &&
        say "RPC tensor cache on the cache disk ($(find "$CACHE_DIR/rpc" -type f | wc -l) files kept)"
fi

# vllm-server: the model is a squashfs of a Hugging Face folder (published by sha256, fetched and checked by
# fetch_model), mounted read-only and served by the image's own entrypoint on the node's address.
start_vllm() {
    port=${port:-8000}
    ready_tries=14400 # vLLM imports torch and loads its kernels first: minutes on a slow CPU
    local path dir=/run/builder/model args=()
    path=$(fetch_model) || { say "no model: cannot start vLLM"; return 1; }
    if ! grep -q " $dir squashfs " /proc/mounts; then
        mkdir -p "$dir"
        "$bb" mount -t squashfs -o ro,loop "$path" "$dir" || { say "the model ${path##*/} does not mount"; return 1; }
    fi
    # Python's multiprocessing (vLLM's engine process) needs a shared-memory folder
    grep -q " /dev/shm " /proc/mounts || { mkdir -p /dev/shm && "$bb" mount -t tmpfs -o mode=1777 shm /dev/shm; }
    [ -n "$vllm_args" ] && IFS=, read -r -a args <<<"$vllm_args"
    [ -n "$vllm_kv" ] && export VLLM_CPU_KVCACHE_SPACE=$vllm_kv
    say "starting vLLM: ${served_name:-model} from ${path##*/}"
    HF_HUB_OFFLINE=1 /usr/local/bin/vllm-entrypoint serve "$dir" --host "$NODE_IP" --port "$port" \
        ${served_name:+--served-model-name "$served_name"} "${args[@]}" &
    child=$!
}

start_role() {
    case "$role" in
        vllm-server)
            start_vllm || return 1
            ;;
        rpc-worker)
            port=${port:-50052}
            /usr/local/bin/llama-entrypoint rpc-worker --host "$NODE_IP" --port "$port" &
            ;;
        head | server)
            port=${port:-8080}
            local path args=()
            path=$(fetch_model) || { say "no model: cannot start the server"; return 1; }
            [ -n "$rpc" ] && args+=(--rpc "$rpc" -ngl 999)
            [ -n "$ctx" ] && args+=(-c "$ctx")
            /usr/local/bin/llama-entrypoint server --model "$path" --host "$NODE_IP" --port "$port" "${args[@]}" &
            ;;
        *)
            say "unknown role '$role'"
            return 1
            ;;
    esac
    child=$!
}

# Ready means the role answers: a TCP connection for a worker, /health saying ok for the server.
is_ready() {
    if [ "$role" != rpc-worker ]; then
        exec 3<>"/dev/tcp/$NODE_IP/$port" || return 1
        printf 'GET /health HTTP/1.0\r\nHost: %s\r\n\r\n' "$NODE_IP" >&3
        local status
        read -r _ status _ <&3
        exec 3<&-
        [ "$status" = 200 ]
    else
        (exec 3<>"/dev/tcp/$NODE_IP/$port") 2>/dev/null
    fi
}

while :; do
    child=""
    if start_role; then
        for _ in $(seq 1 "${ready_tries:-600}"); do
            if is_ready 2>/dev/null; then
                say "$name $role ready on $NODE_IP:$port"
                say_memory
                break
            fi
            kill -0 "$child" 2>/dev/null || break
            sleep 0.5
        done
        wait "$child"
        say "$role exited with status $?; restarting in 5 s"
        check_root
    fi
    sleep 5
done
