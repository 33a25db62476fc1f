#!/bin/bash
# The one llama.cpp build every target and variant runs: configure, compile only what images ship,
# install binaries with their libraries and backend modules into one folder.
# Usage: build-llama.sh SRC BUILD_DIR PREFIX "BINARY..." [--ship=GLOB...] [-DFLAG=VALUE...]
#   --ship=GLOB  also install the files matching GLOB (an SDK's runtime libraries) next to the binaries
set -euo pipefail

src=$1 build=$2 prefix=$3
read -r -a binaries <<<"$4"
shift 4
ship=() flags=()
for arg in "$@"; do
    case "$arg" in
        --ship=*) ship+=("${arg#--ship=}") ;;
        *) flags+=("$arg") ;;
    esac
done

launcher=()
CCACHE_REMOTE_STORAGE="${FTP_PROXY:-}"
unset FTP_PROXY ftp_proxy  # only the compiler cache's URL (with its secret) ever arrives here
if [ -n "$CCACHE_REMOTE_STORAGE" ] && command -v ccache >/dev/null; then
    # The cache lives outside the build (builder serves it); content checks keep hits exact across engines.
    export CCACHE_REMOTE_STORAGE CCACHE_REMOTE_ONLY=true CCACHE_COMPILERCHECK=content CCACHE_DIR=/tmp/ccache
    launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
    # ccache handles nvcc and HIP's clang too: ggml-cuda and ggml-hip are most of a GPU build's compile time
    # (without it a rocm rebuild after any llama.cpp change recompiles every HIP object: 40+ minutes).
    case " ${flags[*]} " in
        *" -DGGML_CUDA=ON "*) launcher+=(-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache) ;;
    esac
    case " ${flags[*]} " in
        *" -DGGML_HIP=ON "*) launcher+=(-DCMAKE_HIP_COMPILER_LAUNCHER=ccache) ;;
    esac
    ccache --zero-stats >/dev/null
fi

echo "[builder] configure llama.cpp: ${flags[*]}"
# Binaries and libraries sit in one folder and find each other through $ORIGIN; ggml looks for its
# backend modules next to the executable. The literal $ORIGIN is meant for the linker.
# shellcheck disable=SC2016
cmake -S "$src" -B "$build" -G Ninja "${launcher[@]}" \
    -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN' "${flags[@]}"

echo "[builder] compile ${binaries[*]} and the ggml backends on $(nproc) cores"
# 'ggml' depends on every backend module when GGML_BACKEND_DL=ON.
cmake --build "$build" --parallel "$(nproc)" --target "${binaries[@]}" ggml

echo "[builder] install into $prefix"
mkdir -p "$prefix/bin"
for binary in "${binaries[@]}"; do
    install -m 0755 "$build/bin/$binary" "$prefix/bin/"
done
find "$build/bin" -maxdepth 1 -name '*.so*' -exec cp -a {} "$prefix/bin/" \;
for pattern in "${ship[@]}"; do
    mapfile -t matches < <(compgen -G "$pattern" || true)
    if [ ${#matches[@]} -eq 0 ]; then
        echo "[builder] --ship=$pattern matches no file" >&2
        exit 1
    fi
    cp -L "${matches[@]}" "$prefix/bin/"
done
find "$prefix/bin" -type f -exec strip --strip-unneeded {} +

if [ ${#launcher[@]} -gt 0 ]; then
    echo "[builder] compiler cache: $(ccache --print-stats | awk -F'\t' '$1 ~ /^(direct_cache_hit|preprocessed_cache_hit|cache_miss)$/ {printf "%s=%s ", $1, $2}')"
fi
echo "[builder] done: $(du -sh "$prefix" | cut -f1) in $prefix"
