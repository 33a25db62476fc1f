#!/bin/bash
# The nvidia/cuda image on a real GPU: what our build machines cannot check, because they have none.
# NOT RUN YET: no GPU machine was lent to the session that wrote it (docs/benchmarks.md says what was proven
# without one). Run it from a checkout (with .venv set up, see the README) on a host with an NVIDIA GPU, the
# driver >= 550 and podman with nvidia-container-toolkit's CDI spec (`builder doctor --target nvidia`).
#
#   bench/gpu_check.sh [OUT_DIR]        (default: ./gpu-check)
#
# It builds the cpu and nvidia images (cached when built before), writes the tests' tiny model, then
#   1. serves the model with every layer on CUDA0 and checks the log says so (buffers on CUDA0, all layers
#      offloaded), so a run that silently fell back to the CPU cannot pass;
#   2. compares the greedy completion with the cpu image's. Criterion: the first 8 tokens must be identical.
#      The model is f16 with weights drawn at a large spread (tests/support/tinymodel.py), so greedy decoding is far
#      from ties; the CUDA and CPU backends round differently (cuBLAS may accumulate f16 products for f16
#      weights), and such differences can grow over many tokens, so the 24-token text is recorded but only
#      the 8-token prefix decides. A wrong or absent CUDA kernel diverges at once;
#   3. runs llama-bench with every layer on the GPU (pp512, tg128) and records the JSON.
# Results: OUT_DIR/gpu-check.json, server logs beside it; exit 1 when a check fails.
set -euo pipefail

out=$(realpath -m "${1:-gpu-check}")
mkdir -p "$out"
builder=(.venv/bin/builder)
python=.venv/bin/python
engine=podman
failed=0

"${builder[@]}" doctor --target nvidia | tee "$out/doctor.txt" || true
"${builder[@]}" build --target cpu --engine "$engine"
"${builder[@]}" build --target nvidia --engine "$engine"

src=$("$python" -c 'from builder.flavours.prepare import prepare; from builder.recipe.load import recipe_path_for
print(prepare(recipe_path_for("cpu")).tree.path)')
"$python" tests/support/tinymodel.py "$src/models/ggml-vocab-llama-spm.gguf" "$out/tiny.gguf"

# serve TARGET PORT NAME [server args...]: start the server in the background, wait until it is healthy.
serve() {
    local target=$1 port=$2 name=$3
    shift 3
    "${builder[@]}" run --target "$target" --engine "$engine" --detach --name "$name" \
        server -m "$out/tiny.gguf" -c 256 --port "$port" "$@" >/dev/null
    for _ in $(seq 1 120); do
        curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && return 0
        sleep 1
    done
    echo "gpu_check: $name did not become healthy" >&2
    podman logs "$name" >&2 || true
    return 1
}

# complete PORT MAX_TOKENS: the greedy completion's text.
complete() {
    curl -fsS "http://127.0.0.1:$1/v1/completions" -H 'Content-Type: application/json' \
        -d "{\"prompt\": \"Once upon a time\", \"max_tokens\": $2, \"temperature\": 0, \"seed\": 42}" |
        "$python" -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["text"], end="")'
}

stop() {
    podman logs "$1" >"$out/$1.log" 2>&1 || true
    podman rm --force "$1" >/dev/null 2>&1 || true
}
trap 'stop gpu-check-cpu; stop gpu-check-cuda' EXIT

serve cpu 18180 gpu-check-cpu -t 4
cpu8=$(complete 18180 8)
cpu24=$(complete 18180 24)
stop gpu-check-cpu

serve nvidia 18181 gpu-check-cuda -ngl 99 -lv 4
cuda8=$(complete 18181 8)
cuda24=$(complete 18181 24)
stop gpu-check-cuda

for evidence in "CUDA0 model buffer size" "offloaded 5/5 layers to GPU"; do
    if grep -q "$evidence" "$out/gpu-check-cuda.log"; then
        echo "gpu_check: ok   log shows: $evidence"
    else
        echo "gpu_check: FAIL log lacks: $evidence (see $out/gpu-check-cuda.log)" >&2
        failed=1
    fi
done
if [ "$cpu8" = "$cuda8" ]; then
    echo "gpu_check: ok   the first 8 greedy tokens match the cpu image: $cuda8"
else
    echo "gpu_check: FAIL greedy text differs within 8 tokens: cpu '$cpu8', cuda '$cuda8'" >&2
    failed=1
fi
[ "$cpu24" = "$cuda24" ] && same24=true || same24=false

"${builder[@]}" run --target nvidia --engine "$engine" \
    bench -m "$out/tiny.gguf" -ngl 99 -p 512 -n 128 -r 3 -o json >"$out/llama-bench.json"

"$python" - "$out" "$cpu24" "$cuda24" "$same24" <<'PY'
import json, sys
out, cpu24, cuda24, same24 = sys.argv[1:]
rows = json.load(open(f"{out}/llama-bench.json"))
result = {"cpu_text_24": cpu24, "cuda_text_24": cuda24, "same_24_tokens": same24 == "true",
          "bench": [{k: row.get(k) for k in ("gpu_info", "backends", "n_prompt", "n_gen", "avg_ts", "stddev_ts")}
                    for row in rows]}
json.dump(result, open(f"{out}/gpu-check.json", "w"), indent=2)
print(json.dumps(result, indent=2))
PY
exit "$failed"
