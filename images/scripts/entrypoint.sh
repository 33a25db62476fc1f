#!/bin/bash
# One entrypoint for every image: `llama-entrypoint ROLE [ARGS...]`.
# RPC workers and the server listen on loopback unless told otherwise: ggml RPC has no authentication.
set -euo pipefail

# The qualification model and the ids its greedy run gave on the CPU when the image was built.
QUALIFY_DIR=/usr/lib/builder

usage() {
    cat <<'USAGE'
usage: ROLE [ARGS...]

roles:
  rpc-worker [--host ADDR] [--port N] [--no-cache] [--seed MODEL.gguf [--seed-tensors FILE]]
             [--allow-public-bind] [--allow-fallback] [ggml-rpc-server args...]
             ggml-rpc-server with its tensor cache (-c) in $LLAMA_CACHE/rpc.
             Default 127.0.0.1:50052. Wildcard addresses (0.0.0.0, ::) are refused unless
             --allow-public-bind is given: RPC is unauthenticated, keep it on a private network.
             Runs check-device first: without the image's device it prints the degraded line and
             exits 1 without listening, unless --allow-fallback (or LLAMA_ALLOW_FALLBACK=1) is given.
             --seed MODEL.gguf [--seed-tensors FILE]: fill the cache from the worker's own copy of the
             model first (rpc-seed), so the head's first load sends hashes instead of large tensors.
  rpc-seed   MODEL.gguf [--cache DIR] [--tensors FILE] [--verify] [--dry-run] [--list]
             write ggml-rpc-server's cache files for MODEL.gguf's tensors over 10 MiB into DIR
             (default $LLAMA_CACHE/rpc), as the server names them; files already there are kept.
             --tensors: only the tensors named in FILE (one a line: those placed on this worker).
             One JSON line; exit 2 for a bad model or list, 1 for a write that failed.
  server     --model PATH [--rpc HOST:PORT,...] [llama-server args...]
             llama-server, default 127.0.0.1:8080.
  bench      [llama-bench args...]
  shell      [bash args...]
  check-device
             does llama.cpp list the device this image is built for ($LLAMA_SMOKE_DEVICE)? One JSON line
             {"state": "ready"|"degraded", "expected", "devices", "why"}; exit 0 ready, 1 degraded
  qualify    check-device, then a greedy run of the tiny model shipped in the image on that device,
             compared with the token ids recorded when the image was built. One JSON line, state
             "qualified" (exit 0), "degraded" (exit 1) or "unqualified" with both id lists (exit 3)
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
    local allow_fallback=${LLAMA_ALLOW_FALLBACK:-0} report seed="" seed_tensors=""
    local extra=()
    while [ $# -gt 0 ]; do
        case "$1" in
            -H | --host) host=${2:?--host needs an address}; shift 2 ;;
            --host=*) host=${1#*=}; shift ;;
            -p | --port) port=${2:?--port needs a number}; shift 2 ;;
            -c | --cache) cache=1; shift ;;
            --no-cache) cache=0; shift ;;
            --allow-public-bind) allow_public=1; shift ;;
            --allow-fallback) allow_fallback=1; shift ;;
            --seed) seed=${2:?--seed needs a GGUF file}; shift 2 ;;
            --seed=*) seed=${1#*=}; shift ;;
            --seed-tensors) seed_tensors=${2:?--seed-tensors needs a file}; shift 2 ;;
            --seed-tensors=*) seed_tensors=${1#*=}; shift ;;
            *) extra+=("$1"); shift ;;
        esac
    done
    if [ -n "$seed" ] && [ "$cache" != 1 ]; then
        echo "rpc-worker: --seed fills the tensor cache, which --no-cache turns off: drop one of them" >&2
        exit 2
    fi
    if [ -n "$seed_tensors" ] && [ -z "$seed" ]; then
        echo "rpc-worker: --seed-tensors names the tensors to take from --seed MODEL.gguf: add --seed" >&2
        exit 2
    fi
    if is_wildcard "$host" && [ "$allow_public" != 1 ]; then
        echo "rpc-worker: refusing to listen on '$host': ggml RPC is unauthenticated and would be open to every network;" \
            "bind a private address (--host 10.0.0.5) or pass --allow-public-bind" >&2
        exit 2
    fi
    # A worker without its device would serve the CPU fallback, 10-50x slower, to a head that cannot tell.
    if ! report=$(check_device); then
        if [ "$allow_fallback" != 1 ]; then
            echo "$report"
            echo "rpc-worker: not listening: no ${LLAMA_SMOKE_DEVICE:-CPU} device (pass --allow-fallback or" \
                "LLAMA_ALLOW_FALLBACK=1 to serve on what llama.cpp lists instead)" >&2
            exit 1
        fi
        echo "rpc-worker: serving without its device, as allowed: $report" >&2
    fi
    if [ -n "$seed" ]; then
        local seeded rc=0 options=()
        [ -n "$seed_tensors" ] && options+=(--tensors "$seed_tensors")
        seeded=$(llama-rpc-seed "${options[@]}" -- "$seed" "$LLAMA_CACHE/rpc") || rc=$?
        if [ "$rc" = 2 ] || [ -z "$seeded" ]; then
            echo "rpc-worker: not listening: cannot seed the tensor cache from $seed (see above)" >&2
            exit 2
        fi
        # A failed write leaves no file under a cache name: the head sends those tensors itself.
        echo "rpc-worker: seeded $LLAMA_CACHE/rpc from $seed: $seeded" >&2
    fi
    local args=(-H "$host" -p "$port")
    [ "$cache" = 1 ] && args+=(-c)
    echo "rpc-worker: ggml-rpc-server on $host:$port (cache: $([ "$cache" = 1 ] && echo "$LLAMA_CACHE/rpc" || echo off))" >&2
    exec ggml-rpc-server "${args[@]}" "${extra[@]}"
}

rpc_seed() {
    local cache=$LLAMA_CACHE/rpc model="" options=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --cache) cache=${2:?--cache needs a folder}; shift 2 ;;
            --cache=*) cache=${1#*=}; shift ;;
            --tensors | --threads) options+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
            --verify | --dry-run | --list) options+=("$1"); shift ;;
            --) shift ;;
            -*)
                echo "rpc-seed: unknown option '$1' (--cache, --tensors, --threads, --verify, --dry-run, --list)" >&2
                exit 2
                ;;
            *)
                if [ -n "$model" ]; then
                    echo "rpc-seed: one model at a time ('$model', then '$1'): run it once per GGUF file" >&2
                    exit 2
                fi
                model=$1
                shift
                ;;
        esac
    done
    if [ -z "$model" ]; then
        echo "rpc-seed: name the model: rpc-seed MODEL.gguf [--cache DIR] [--tensors FILE]" >&2
        exit 2
    fi
    exec llama-rpc-seed "${options[@]}" -- "$model" "$cache"
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
    # The image's own record of the qualification run (written by its build) must hold on the CPU here too.
    local recorded got
    recorded=$(cat "$QUALIFY_DIR/qualify.json" 2>/dev/null || true)
    got=$(llama-qualify run "$QUALIFY_DIR/qualify.gguf" --cpu 2>&1 || true)
    if [ -n "$(ids_of "$recorded")" ] && [ "$(ids_of "$got")" = "$(ids_of "$recorded")" ]; then
        echo "smoke: ok   qualification model: the CPU gives the recorded ids ($(ids_of "$got"))"
    else
        echo "smoke: FAIL qualification model: recorded ${recorded:-nothing}, the CPU gave: ${got:-nothing}" >&2
        failed=1
    fi
    llama-server --version 2>&1 | sed -n 's/^version: /smoke: version /p'
    return "$failed"
}

# --- readiness: the device, then the answers ---

# $1 as a JSON string (quotes included): backslash and quote escaped, line breaks and tabs written as
# escapes, other control characters dropped.
json_string() {
    local text=$1
    text=${text//\\/\\\\}
    text=${text//\"/\\\"}
    text=${text//$'\n'/\\n}
    text=${text//$'\r'/\\r}
    text=${text//$'\t'/\\t}
    printf '"%s"' "$(printf '%s' "$text" | tr -d '\000-\037')"
}

# The driver's last line in the kernel log ($LLAMA_DRIVER_MODULES: the kernel modules of this image's
# device), or why there is none. Containers usually may not read the kernel log; that is said, not hidden.
kernel_log_line() {
    local modules=${LLAMA_DRIVER_MODULES:-} log line
    [ -n "$modules" ] || return 0
    if ! log=$(dmesg 2>&1); then
        echo "kernel log not readable here (${log##*$'\n'}): read it on the host (dmesg | grep -E '${modules// /|}')"
        return 0
    fi
    line=$(grep -E "\b(${modules// /|})\b" <<<"$log" | tail -n 1 || true)
    if [ -n "$line" ]; then
        echo "last ${modules// /\/} kernel log line: $line"
    else
        echo "no ${modules// /\/} line in the kernel log (is the module loaded?)"
    fi
}

# One JSON line: does llama.cpp list the device this image is built for? Returns 0 when it does.
check_device() {
    local expected=${LLAMA_SMOKE_DEVICE:-CPU} out line name description found="" listed="" notes state why
    local names="" missing=${LLAMA_SMOKE_DEVICE:-CPU}
    # An unknown device makes ggml-rpc-server list every device its backends found (the CPU included).
    out=$(ggml-rpc-server -d builder-list-devices 2>&1 || true)
    while IFS= read -r line; do
        [[ $line =~ ^\ \ ([A-Za-z0-9_]+):\ (.*)$ ]] || continue
        name=${BASH_REMATCH[1]} description=${BASH_REMATCH[2]}
        names+="${names:+, }$(json_string "$name")"
        listed+="${listed:+, }$name ($description)"
        if [[ -z $found && ( $name == "$expected" || $name =~ ^${expected}[0-9]+$ ) ]]; then
            found="$name ($description)"
        fi
    done <<<"$out"
    # The OpenVINO backend lists its device even when the one asked for (GGML_OPENVINO_DEVICE) is absent:
    # it falls back to OpenVINO's CPU plugin, which says so.
    if [ -n "$found" ] && grep -q "is not available, fallback to CPU" <<<"$out"; then
        notes=$(grep -m1 "is not available, fallback to CPU" <<<"$out" | sed 's/^[^:]*: //')
        missing="${GGML_OPENVINO_DEVICE:-NPU} (OpenVINO)" found=""
    else
        notes=$(grep -iE "no devices found|failed to initialize|error while loading" <<<"$out" | grep -v '^No devices found$' \
            | head -n 2 | tr '\n' ' ' | sed 's/ *$//' || true)
    fi
    if [ -n "$found" ]; then
        state=ready why="llama.cpp lists $found"
    else
        state=degraded
        why="no $missing device: llama.cpp lists ${listed:-no device at all}${notes:+; $notes}"
        local kernel
        kernel=$(kernel_log_line)
        why+="${kernel:+; $kernel}"
    fi
    printf '{"state": "%s", "expected": %s, "devices": [%s], "why": %s}\n' "$state" "$(json_string "$expected")" \
        "$names" "$(json_string "$why")"
    [ "$state" = ready ]
}

# The ids field of a JSON line llama-qualify wrote ("ids": [1, 2, 3]), or nothing.
ids_of() { sed -n 's/.*"ids": \[\([0-9, ]*\)\].*/\1/p' <<<"$1"; }
field_of() { sed -n "s/.*\"$1\": \"\{0,1\}\([A-Za-z0-9_.]*\).*/\1/p" <<<"$2"; }

qualify() {
    local report recorded expected_ids got device recorded_on gap errors state why
    if ! report=$(check_device); then
        echo "$report"
        return 1
    fi
    recorded=$(cat "$QUALIFY_DIR/qualify.json" 2>/dev/null || true)
    expected_ids=$(ids_of "$recorded")
    recorded_on=$(field_of device "$recorded")
    errors=$(mktemp)
    if ! got=$(llama-qualify run "$QUALIFY_DIR/qualify.gguf" 2>"$errors"); then
        got=""
        why="llama-qualify failed: $(grep -v '^load_backend' "$errors" | tail -n 1)"
    fi
    rm -f "$errors"
    device=$(field_of device "$got")
    gap=$(field_of min_gap "$got")
    if [ -z "$expected_ids" ]; then
        state=unqualified why="$QUALIFY_DIR/qualify.json holds no recorded ids"
    elif [ -z "$got" ]; then
        state=unqualified
    elif [ "$(ids_of "$got")" = "$expected_ids" ]; then
        state=qualified why="$device gives the ids recorded on ${recorded_on:-the build host}"
    else
        local mine theirs step=0
        read -r -a mine <<<"$(ids_of "$got" | tr -d ,)"
        read -r -a theirs <<<"$(tr -d , <<<"$expected_ids")"
        while [ "$step" -lt "${#mine[@]}" ] && [ "${mine[step]}" = "${theirs[step]:-}" ]; do step=$((step + 1)); done
        state=unqualified
        why="$device gives other ids than those recorded on ${recorded_on:-the build host}, from step $step on"
        [ "$device" != "$recorded_on" ] && why+=" (ids were never recorded on $device itself)"
    fi
    printf '{"state": "%s", "expected": %s, "device": %s, "ids": [%s], "recorded": [%s], "recorded_on": %s, "min_gap": %s, "why": %s}\n' \
        "$state" "$(json_string "${LLAMA_SMOKE_DEVICE:-CPU}")" "$(json_string "$device")" "$(ids_of "$got")" \
        "$expected_ids" "$(json_string "$recorded_on")" "${gap:-null}" "$(json_string "$why")"
    [ "$state" = qualified ] && return 0
    return 3
}

role=${1:-help}
[ $# -gt 0 ] && shift
case "$role" in
    rpc-worker) rpc_worker "$@" ;;
    rpc-seed) rpc_seed "$@" ;;
    server) server "$@" ;;
    bench) exec llama-bench "$@" ;;
    shell) exec bash "$@" ;;
    smoke) smoke ;;
    check-device) check_device ;;
    qualify) qualify ;;
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
