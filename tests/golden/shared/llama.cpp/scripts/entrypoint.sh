#!/bin/bash
# One entrypoint for every image: `llama-entrypoint ROLE [ARGS...]`.
# RPC workers and the server listen on loopback unless told otherwise: ggml RPC has no authentication.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: ROLE [ARGS...]

roles:
  rpc-worker [--host ADDR] [--port N] [--no-cache] [--allow-public-bind] [ggml-rpc-server args...]
             ggml-rpc-server with its tensor cache (-c) in $LLAMA_CACHE/rpc.
             Default 127.0.0.1:50052. Wildcard addresses (0.0.0.0, ::) are refused unless
             --allow-public-bind is given: RPC is unauthenticated, keep it on a private network.
  server     --model PATH [--rpc HOST:PORT,...] [llama-server args...]
             llama-server, default 127.0.0.1:8080.
  bench      [llama-bench args...]
  shell      [bash args...]
  smoke      check that every binary runs and the expected device is listed; without the device,
             its backend must load and the missing device is reported (LLAMA_SMOKE_REQUIRE_DEVICE=1: fail)
  help       this text
USAGE
}

# Every spelling of "any address" counts: the inet_aton forms of 0.0.0.0 (0, 0x0, 0.0, 000.000.000.000 …),
# IPv6's unspecified address however written (::, ::0, [::], 0:0:0:0:0:0:0:0, ::ffff:0.0.0.0), words some
# servers take for it, and names that resolve to one of these.
is_wildcard() {
    local host=${1,,} resolved
    host=${host//[[:space:]]/}
    host=${host#[}
    host=${host%]}
    host=${host%%\%*}
    case "$host" in
        "" | "*" | any | all | inaddr_any | in6addr_any | 0/0 | ::/0 | 0.0.0.0/0) return 0 ;;
    esac
    # IPv4: one to four parts, each zero in decimal, octal or hex
    [[ $host =~ ^(0+|0x0*)(\.(0+|0x0*)){0,3}$ ]] && return 0
    # IPv6: nothing but zero groups (and a zero IPv4 tail), or the IPv4-mapped 0.0.0.0
    [[ $host == *:* && $host =~ ^[0:.x]+$ ]] && return 0
    [[ $host =~ ^[0:]*:ffff:(0+|0x0*)(\.(0+|0x0*)){0,3}$ ]] && return 0
    # a name: what it resolves to (glibc's resolver, as the server's own)
    if [[ ! $host =~ ^[0-9.]+$ && $host != *:* ]] && command -v getent >/dev/null; then
        resolved=$(getent ahosts -- "$host" 2>/dev/null | awk '{print $1}' | sort -u) || true
        local address
        for address in $resolved; do
            case "$address" in 0.0.0.0 | :: | ::ffff:0.0.0.0) return 0 ;; esac
        done
    fi
    return 1
}

rpc_worker() {
    local host=127.0.0.1 port=50052 cache=1 allow_public=${LLAMA_RPC_ALLOW_PUBLIC:-0}
    local extra=()
    while [ $# -gt 0 ]; do
        case "$1" in
            -H | --host) host=${2:?--host needs an address}; shift 2 ;;
            --host=*) host=${1#*=}; shift ;;
            -p | --port) port=${2:?--port needs a number}; shift 2 ;;
            -c | --cache) cache=1; shift ;;
            --no-cache) cache=0; shift ;;
            --allow-public-bind) allow_public=1; shift ;;
            *) extra+=("$1"); shift ;;
        esac
    done
    if is_wildcard "$host" && [ "$allow_public" != 1 ]; then
        echo "rpc-worker: refusing to listen on '$host': ggml RPC is unauthenticated and would be open to every network;" \
            "bind a private address (--host 10.0.0.5) or pass --allow-public-bind" >&2
        exit 2
    fi
    local args=(-H "$host" -p "$port")
    [ "$cache" = 1 ] && args+=(-c)
    echo "rpc-worker: ggml-rpc-server on $host:$port (cache: $([ "$cache" = 1 ] && echo "$LLAMA_CACHE/rpc" || echo off))" >&2
    exec ggml-rpc-server "${args[@]}" "${extra[@]}"
}

server() {
    local have_host=0 have_port=0 arg
    for arg in "$@"; do
        case "$arg" in
            --host) have_host=1 ;;
            --port) have_port=1 ;;
        esac
    done
    local defaults=()
    [ "$have_host" = 1 ] || defaults+=(--host 127.0.0.1)
    [ "$have_port" = 1 ] || defaults+=(--port 8080)
    exec llama-server "${defaults[@]}" "$@"
}

# Images whose backend needs a library of the host's driver (LLAMA_DRIVER_LIBS, e.g. the CUDA driver's
# libcuda.so.1, which CDI or --gpus mounts) cannot load that backend on a machine without the device. There
# every other library the binaries and modules need must still resolve inside the image. Sets driver_absent
# to the driver libraries missing here; fails on any other missing library.
driver_absent=""
driver_libraries() {
    local file state name lib unresolved=()
    local -A wanted=() found=()
    for lib in ${LLAMA_DRIVER_LIBS:-}; do wanted[$lib]=1; done
    for file in /opt/llama/bin/*; do
        while read -r state name; do
            if [ -z "${wanted[$name]:-}" ]; then
                [ "$state" = missing ] && unresolved+=("${file##*/} needs $name")
            elif [ "$state" = missing ]; then
                driver_absent+=" $name"
            else
                found[$name]=1
            fi
        done < <(ldd "$file" 2>/dev/null | awk '$2 == "=>" {print ($3 == "not" ? "missing" : "found"), $1}')
    done
    # A driver library no file names directly (loaded at run time) counts as present when the loader knows it.
    for lib in "${!wanted[@]}"; do
        [ -n "${found[$lib]:-}" ] && continue
        ldconfig -p | awk -v lib="$lib" '$1 == lib {found = 1} END {exit !found}' || driver_absent+=" $lib"
    done
    if [ ${#unresolved[@]} -gt 0 ]; then
        echo "smoke: FAIL libraries missing from the image: ${unresolved[*]}" >&2
        return 1
    fi
    driver_absent=$(tr ' ' '\n' <<<"$driver_absent" | sort -u | xargs)
    echo "smoke: ok   libraries: all resolve in the image, except the host driver's ${LLAMA_DRIVER_LIBS}"
}

smoke() {
    local failed=0 binary out device=${LLAMA_SMOKE_DEVICE:-CPU}
    for binary in /opt/llama/bin/*; do
        case "$binary" in *.so*) continue ;; esac
        case "${binary##*/}" in
            ggml-rpc-server | llama-bench) out=$("$binary" --help 2>&1) || true ;;
            *) out=$("$binary" --version 2>&1) || true ;;
        esac
        if [ -z "$out" ] || grep -qE 'error while loading shared libraries|not found' <<<"$out"; then
            echo "smoke: FAIL ${binary##*/}: ${out:-no output}" >&2
            failed=1
        else
            echo "smoke: ok   ${binary##*/}"
        fi
    done
    if [ -n "${LLAMA_DRIVER_LIBS:-}" ]; then
        driver_libraries || failed=1
    fi
    # An unknown device makes ggml-rpc-server list the devices its backends found, then exit.
    # GGML_VK_VISIBLE_DEVICES=0 lets ggml-vulkan list a software device too (a build host has no GPU).
    out=$(GGML_VK_VISIBLE_DEVICES="${GGML_VK_VISIBLE_DEVICES:-0}" ggml-rpc-server -d smoke-list-devices 2>&1 || true)
    local reason
    if grep -qE "^  ${device}[0-9]*: " <<<"$out"; then
        echo "smoke: ok   device $(grep -E "^  ${device}[0-9]*: " <<<"$out" | head -n1 | sed 's/^ *//')"
    elif [ -n "$driver_absent" ] && [ "${LLAMA_SMOKE_REQUIRE_DEVICE:-0}" != 1 ]; then
        # Not a failure: a build host has no GPU. Say it plainly, so nobody mistakes this for a device check.
        echo "smoke: note no ${device} device present: the host driver's $driver_absent is not in" \
            "this container (it comes with the device, through CDI or --gpus); only the CPU backend was listed"
    elif grep -qE "loaded ${device} backend from " <<<"$out" && [ "${LLAMA_SMOKE_REQUIRE_DEVICE:-0}" != 1 ]; then
        # The backend module and every library it needs loaded; only the device is absent (a build host,
        # or a container started without the device). Not a defect of the image.
        reason=$(grep -oE "failed to initialize ${device}: .*" <<<"$out" | head -n1 | sed 's/^failed to initialize [^:]*: //')
        echo "smoke: ok   ${device} backend loaded, but NO ${device} DEVICE is present on this machine" \
            "(${reason:-it found none}): this image runs on the CPU backend here;" \
            "run it where the device is passed in (LLAMA_SMOKE_REQUIRE_DEVICE=1 makes this a failure)"
    else
        echo "smoke: FAIL no ${device} device listed by the ggml backends:" >&2
        echo "$out" >&2
        failed=1
    fi
    llama-server --version 2>&1 | sed -n 's/^version: /smoke: version /p'
    return "$failed"
}

role=${1:-help}
[ $# -gt 0 ] && shift
case "$role" in
    rpc-worker) rpc_worker "$@" ;;
    server) server "$@" ;;
    bench) exec llama-bench "$@" ;;
    shell) exec bash "$@" ;;
    smoke) smoke ;;
    # Toolbx starts its containers with `toolbox init-container …` as the command (the binary is mounted
    # from the host), not as an entrypoint.
    toolbox) exec toolbox "$@" ;;
    help | -h | --help) usage ;;
    *)
        echo "unknown role '$role'" >&2
        usage >&2
        exit 2
        ;;
esac
