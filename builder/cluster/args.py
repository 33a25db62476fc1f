"""What a cluster file may add to the servers builder starts: tuning flags in a service's `args` and device or
thread settings in a node's `env`, from allow-lists per engine.

builder binds every server to its node's address and port, names its model and alias, and keeps the API behind
the gateway. A flag or variable it does not set itself (`--api-key`, `--host` on another address, `--slots`,
`--tools`, a second model, `LLAMA_ARG_*`, `VLLM_*`, `AIP_MODE` …) could undo that, and putting builder's flags
last cannot switch off what builder never sets. So anything outside these tables needs `unsafe_args: true` on
the service (`unsafe_env: true` on the node), which loads with one warning line naming what it lets through.
"""

import re
from collections.abc import Iterable, Mapping

from builder.core.errors import RecipeError

# llama-server's tuning flags, each with whether it takes a value; every name is checked against the pinned
# llama.cpp's common/arg.cpp (tests/unit/test_cluster_args.py). The pinned llama.cpp has no --mlock/--no-mmap: its
# -lm/--load-mode takes mmap, mlock, none, …
LLAMA_CPP_FLAGS: dict[str, bool] = {
    **dict.fromkeys(("-t", "--threads", "-tb", "--threads-batch", "-c", "--ctx-size", "-n", "--predict",
                     "--n-predict", "-b", "--batch-size", "-ub", "--ubatch-size", "-np", "--parallel", "-fa",
                     "--flash-attn", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v", "-ngl", "--n-gpu-layers",
                     "--gpu-layers", "-sm", "--split-mode", "-ts", "--tensor-split", "-mg", "--main-gpu", "-dev",
                     "--device", "--numa", "-lm", "--load-mode", "-lv", "--verbosity", "--log-verbosity",
                     "--cache-reuse", "-cram", "--cache-ram", "--rope-scaling", "--rope-scale", "--rope-freq-base",
                     "--rope-freq-scale", "--temp", "--top-k", "--top-p", "--min-p", "--repeat-penalty", "-s",
                     "--seed", "--chat-template", "--reasoning-format", "--reasoning-budget", "-to", "--timeout",
                     "--threads-http", "-sps", "--slot-prompt-similarity", "-ncmoe", "--n-cpu-moe", "-ot",
                     "--override-tensor", "--prio", "--poll", "-C", "--cpu-mask", "-Cr", "--cpu-range", "--keep",
                     "-fit", "--fit"), True),
    **dict.fromkeys(("-cb", "--cont-batching", "-nocb", "--no-cont-batching", "-kvu", "--kv-unified", "-no-kvu",
                     "--no-kv-unified", "--swa-full", "-kvo", "--kv-offload", "-nkvo", "--no-kv-offload",
                     "--jinja", "--no-jinja", "--no-warmup", "-cmoe", "--cpu-moe", "--context-shift",
                     "--no-context-shift", "--cache-prompt", "--no-cache-prompt", "-v", "--verbose",
                     "--no-op-offload"), False),
}

# `vllm serve`'s tuning flags (vLLM 0.32.0, the version the locks pin), each with whether it takes a value.
VLLM_FLAGS: dict[str, bool] = {
    **dict.fromkeys(("--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--gpu-memory-utilization",
                     "--dtype", "--kv-cache-dtype", "--block-size", "--swap-space", "--cpu-offload-gb",
                     "--quantization", "-q", "--tensor-parallel-size", "-tp", "--seed", "--max-logprobs",
                     "--tool-call-parser", "--reasoning-parser", "--compilation-config", "-O",
                     "--limit-mm-per-prompt", "--max-seq-len-to-capture", "--kv-cache-memory-bytes",
                     # single fields of the compilation config, e.g. -cc.backend=eager
                     "-cc.backend", "-cc.mode", "-cc.cudagraph_mode"), True),
    **dict.fromkeys(("--enforce-eager", "--enable-prefix-caching", "--no-enable-prefix-caching",
                     "--enable-chunked-prefill", "--no-enable-chunked-prefill", "--enable-auto-tool-choice"), False),
}
ENGINE_FLAGS = {"llama.cpp": LLAMA_CPP_FLAGS, "vllm": VLLM_FLAGS}

# The environment of RPC over RDMA, each name with the values it takes and what they are, checked even with
# unsafe_env (ggml-rpc reads them with getenv and atoi).
RDMA_ENV: dict[str, tuple[str, str]] = {
    "GGML_RDMA_DEV": (r"[A-Za-z0-9_.-]{1,64}", "an RDMA device name as `rdma link` shows it, e.g. mlx5_0"),
    "GGML_RDMA_GID": (r"[0-9]{1,3}", "a GID index, e.g. 3 (`show_gids` lists them)"),
    # ggml-rpc reads only whether it is set: "0" would switch RDMA off too
    "GGML_RPC_NO_RDMA": (r"1", "1, to keep RPC on TCP (leave it out otherwise)"),
}
# Which devices and how many threads a node's servers use.
ENV_NAMES = frozenset((
    "GGML_VK_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER", "ONEAPI_DEVICE_SELECTOR", "ZE_AFFINITY_MASK", "GGML_OPENVINO_DEVICE",
    "HSA_OVERRIDE_GFX_VERSION", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
    # vLLM's CPU backend takes its KV cache size and thread placement only from the environment: tuning, like
    # the threads above (the other VLLM_* names set its address, ports or model, and count as args)
    "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU",
    # "1": a node's RPC worker serves on what llama.cpp lists when its image's device is missing, instead of
    # refusing to listen (the image's rpc-worker role; its check-device line still says degraded)
    "LLAMA_ALLOW_FALLBACK",
    # RPC over RDMA (an image built with rpc_rdma): which RDMA device and GID index ggml-rpc uses, or TCP only
    *RDMA_ENV,
))
# These set a server's arguments (llama.cpp reads LLAMA_ARG_*, vLLM VLLM_*, Ray RAY_*, llama-server's Vertex AI
# mode AIP_* adds routes): they are args by another name.
ARG_PREFIXES = ("LLAMA_ARG_", "VLLM_", "RAY_", "AIP_")


def refused_args(engine: str, args: Iterable[str]) -> list[tuple[int, str, str]]:
    """(index, argument, why) for each argument of `args` outside `engine`'s allow-list."""
    flags = ENGINE_FLAGS[engine]
    out = []
    words = list(args)
    i = 0
    while i < len(words):
        word = words[i]
        name, has_value, _ = word.partition("=")
        if not word.startswith("-") or word in ("-", "--"):
            out.append((i, word, "a positional argument (a second model, a prompt) is not a tuning flag"))
        elif name not in flags:
            out.append((i, word, f"{name} is not on builder's list of {engine} tuning flags"))
        elif flags[name] and not has_value:
            if i + 1 >= len(words):
                out.append((i, word, f"{name} needs a value"))
            i += 1  # its value, whatever it looks like (-1 is a value)
        elif has_value and not flags[name]:
            out.append((i, word, f"{name} takes no value"))
        i += 1
    return out


def refused_env(names: Iterable[str]) -> list[tuple[str, str]]:
    """(name, why) for each environment name outside the allow-list."""
    return [(name, f"{name} sets the server's arguments, which builder chooses" if name.startswith(ARG_PREFIXES)
             else f"{name} is not on builder's list of device and thread variables")
            for name in names if name not in ENV_NAMES]


def check_args(where: str, field: str, engine: str, args: list[str], unsafe: bool) -> str | None:
    """A refusal for the first argument outside the allow-list, or with `unsafe` the warning line naming every
    one of them (None when all are on the list)."""
    refused = refused_args(engine, args)
    if not refused:
        return None
    if unsafe:
        return (f"{where}: {field}.unsafe_args: passes {' '.join(a for _, a, _ in refused)} to {engine} unchecked; "
                "they can undo builder's bindings (address, port, model, the gateway's key)")
    index, _, why = refused[0]
    raise RecipeError(f"{where}: {field}.args[{index}]: {why}",
                      f"use a tuning flag ({engine}'s list is in docs/clusters.md), or set unsafe_args: true on "
                      "the service if you mean it")


def check_env(where: str, field: str, env: Mapping[str, str], unsafe: bool) -> str | None:
    """As check_args, for a node's environment names (and the values of RDMA_ENV's, always checked)."""
    for name, value in env.items():
        if name in RDMA_ENV and not re.fullmatch(RDMA_ENV[name][0], value):
            raise RecipeError(f"{where}: {field}.env.{name}: {value[:40]!r} is not {RDMA_ENV[name][1]}",
                              "see docs/clusters.md, RPC over RDMA")
    refused = refused_env(env)
    if not refused:
        return None
    if unsafe:
        return (f"{where}: {field}.unsafe_env: passes {' '.join(n for n, _ in refused)} to the node's servers "
                "unchecked; they can undo builder's bindings")
    name, why = refused[0]
    raise RecipeError(f"{where}: {field}.env.{name}: {why}",
                      "use a service's args for server flags; device and thread variables are listed in "
                      "docs/clusters.md; set unsafe_env: true on the node if you mean it")
