#!/bin/bash
# One entrypoint for every vLLM image: `vllm-entrypoint ROLE [ARGS...]`.
# The API server and Ray listen on loopback unless told otherwise. Ray has no authentication: anyone who
# reaches its ports runs code on the cluster, so wildcard addresses need --allow-public-bind.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: ROLE [ARGS...]

roles:
  serve      MODEL [--host ADDR] [--port N] [vllm serve args...]
             vLLM's OpenAI-compatible server, default 127.0.0.1:8000.
  ray-head   [--host ADDR] [--port N] [--allow-public-bind] [ray start args...]
             (Ray token authentication: every node needs the same RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)
             the Ray head of a multi-node vLLM (--distributed-executor-backend ray), default 127.0.0.1:6379.
  ray-worker --head ADDR:PORT [--host ADDR] [--allow-public-bind] [ray start args...]
             a Ray worker node that joins the head; --host is this node's own address (default 127.0.0.1).
             Ray is unauthenticated: wildcard addresses (0.0.0.0, ::) are refused unless --allow-public-bind
             is given. Bind each node's private cluster address instead.
  shell      [bash args...]
  smoke      check vllm --version, the import, the server's --help, Ray and the Python version
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

refuse_wildcard() {
    local role=$1 host=$2 allow=$3
    if is_wildcard "$host" && [ "$allow" != 1 ]; then
        echo "$role: refusing to listen on '$host': Ray is unauthenticated and would be open to every network;" \
            "bind a private address (--host 10.0.0.5) or pass --allow-public-bind" >&2
        exit 2
    fi
}

serve() {
    local have_host=0 have_port=0 arg
    for arg in "$@"; do
        case "$arg" in
            --host | --host=*) have_host=1 ;;
            --port | --port=*) have_port=1 ;;
        esac
    done
    local defaults=()
    [ "$have_host" = 1 ] || defaults+=(--host 127.0.0.1)
    [ "$have_port" = 1 ] || defaults+=(--port 8000)
    exec vllm serve "$@" "${defaults[@]}"
}

ray_node() {
    local role=$1
    shift
    local host=127.0.0.1 port=6379 head="" allow=${VLLM_RAY_ALLOW_PUBLIC:-0}
    local extra=()
    while [ $# -gt 0 ]; do
        case "$1" in
            -H | --host | --node-ip-address) host=${2:?$1 needs an address}; shift 2 ;;
            --node-ip-address=*) host=${1#*=}; shift ;;
            -p | --port) port=${2:?--port needs a number}; shift 2 ;;
            --head | --address) head=${2:?$1 needs ADDR:PORT}; shift 2 ;;
            --allow-public-bind) allow=1; shift ;;
            *) extra+=("$1"); shift ;;
        esac
    done
    refuse_wildcard "$role" "$host" "$allow"
    local args=(--block --node-ip-address "$host" --disable-usage-stats)
    if [ "$role" = ray-head ]; then
        args+=(--head --port "$port" --include-dashboard false)
        echo "ray-head: Ray head on $host:$port; workers join with: ray-worker --head $host:$port --host <their address>" >&2
    else
        if [ -z "$head" ]; then
            echo "ray-worker: --head ADDR:PORT (the head's address) is required" >&2
            exit 2
        fi
        args+=(--address "$head")
        echo "ray-worker: joining $head as $host" >&2
    fi
    # Ray's servers listen on more addresses than the one given, so every node must prove it holds the
    # cluster's shared token (Ray's token authentication); turning it off has to be said explicitly.
    if [ "$RAY_AUTH_MODE" != disabled ]; then
        export RAY_AUTH_MODE=token
        if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
            echo "$role: Ray token authentication is on and no token was given: pass the same secret to every node," \
                "e.g. export RAY_AUTH_TOKEN=\$(openssl rand -hex 32) and builder run --env RAY_AUTH_TOKEN ...;" \
                "RAY_AUTH_MODE=disabled turns authentication off" >&2
            exit 2
        fi
    fi
    exec ray start "${args[@]}" "${extra[@]}"
}

# vLLM's CUDA kernel libraries: loaded where the GPU is; without it (no libcuda.so.1, which the driver
# brings), every other library they need must still resolve within the image (CUDA runtime, torch).
cuda_kernels() {
    local no_gpu=$1
    python3 - "$no_gpu" <<'PY'
import glob, os, subprocess, sys, sysconfig
import torch
if not torch.version.cuda:
    sys.exit(f"torch {torch.__version__} is not a CUDA build")
site = sysconfig.get_paths()["purelib"]
libs = sorted(glob.glob(os.path.join(site, "vllm", "*.so")))
if sys.argv[1] == "0":
    import vllm._C_stable_libtorch  # noqa: F401
    print("cuda kernels load; torch CUDA", torch.version.cuda, "with", torch.cuda.device_count(), "GPU(s)")
    sys.exit(0)
dirs = [os.path.join(site, "torch", "lib"), *glob.glob(os.path.join(site, "nvidia", "**", "lib"), recursive=True)]
env = {**os.environ, "LD_LIBRARY_PATH": ":".join(dirs)}
missing = set()
for lib in libs:
    out = subprocess.run(["ldd", lib], env=env, capture_output=True, text=True, check=True).stdout
    missing |= {line.split()[0] for line in out.splitlines() if "not found" in line}
if not libs or missing - {"libcuda.so.1"}:
    sys.exit(f"{len(libs)} kernel libraries; unresolved: {', '.join(sorted(missing)) or 'none'}")
print(f"cuda kernels link: {len(libs)} libraries, torch CUDA {torch.version.cuda}; "
      "only the driver's libcuda.so.1 is left to the GPU node")
PY
}

smoke() {
    local failed=0 out python version
    check() {
        local what=$1 pattern=$2 text=$3
        if grep -qE "cannot be preloaded|^Traceback" <<<"$text" || ! grep -qE -- "$pattern" <<<"$text"; then
            echo "smoke: FAIL $what:" >&2
            tail -n 20 <<<"$text" >&2
            failed=1
        else
            echo "smoke: ok   $what"
        fi
    }
    # vLLM picks its platform when the CLI starts and stops without the device's driver. Without the device,
    # the CLI checks run on vLLM's CPU platform (its own switch for accelerator wheels on CPU-only machines),
    # and the device build is checked by loading its kernels library.
    local node="" cli=()
    case "${VLLM_SMOKE_DEVICE:-cpu}" in
        cuda) node=/dev/nvidiactl ;;
        rocm) node=/dev/kfd ;;
        xpu) node=/dev/dri ;;
    esac
    if [ -n "$node" ] && [ ! -e "$node" ]; then
        echo "smoke: note no $node here: the CLI checks run with VLLM_TARGET_DEVICE=cpu"
        cli=(env VLLM_TARGET_DEVICE=cpu)
    fi
    python=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>&1 || true)
    check "python $python (expected ${VLLM_SMOKE_PYTHON:-?})" "^${VLLM_SMOKE_PYTHON:-none}$" "$python"
    if [ "${VLLM_SMOKE_DEVICE:-cpu}" = cuda ]; then
        out=$(cuda_kernels "${#cli[@]}" 2>&1 || true)
        check "$(tail -n 1 <<<"$out")" "^cuda kernels (load|link)" "$out"
    fi
    version=$("${cli[@]}" vllm --version 2>&1 || true)
    check "vllm --version: $(tail -n 1 <<<"$version")" "^${VLLM_SMOKE_VERSION:-none}" "$(tail -n 1 <<<"$version")"
    out=$(python3 -c 'import vllm, torch; print("import vllm", vllm.__version__, "torch", torch.__version__)' 2>&1 || true)
    check "$(tail -n 1 <<<"$out")" "^import vllm " "$out"
    out=$("${cli[@]}" timeout 300 vllm serve --help=host 2>&1 || true)
    check "vllm serve --help" "--host HOST" "$out"
    out=$(ray --version 2>&1 || true)
    check "$(tail -n 1 <<<"$out")" "^ray, version " "$out"
    return "$failed"
}

role=${1:-help}
# Every Ray client and server started from a role (vllm serve with the ray backend, a shell) uses the
# token authentication the ray roles turn on.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
[ $# -gt 0 ] && shift
case "$role" in
    serve) serve "$@" ;;
    ray-head | ray-worker) ray_node "$role" "$@" ;;
    shell) exec bash "$@" ;;
    smoke) smoke ;;
    help | -h | --help) usage ;;
    *)
        echo "unknown role '$role'" >&2
        usage >&2
        exit 2
        ;;
esac
