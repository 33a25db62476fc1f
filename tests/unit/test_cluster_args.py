"""A cluster file tunes the servers but cannot undo builder's bindings: `args` and `env` come from allow-lists per
engine, anything else needs `unsafe_args` / `unsafe_env` and says so in one warning line (docs/clusters.md)."""

import re
from pathlib import Path
from typing import Any

import pytest
from test_cluster import cluster_file, node, service
from test_cluster_vllm import cluster_file as vllm_cluster_file
from test_cluster_vllm import vllm

from builder.cluster.args import LLAMA_CPP_FLAGS, refused_args
from builder.cluster.model import load_cluster
from builder.core.errors import RecipeError
from conftest import run_cli


def load_args(tmp_path: Path, args: list[str], **extra: Any) -> tuple[str, ...]:
    return load_cluster(cluster_file(tmp_path, services=[service("chat", nodes=["a"], args=args, **extra)])).warnings


def test_tuning_flags_load_without_a_warning(tmp_path: Path) -> None:
    args = ["-t", "4", "--ctx-size=8192", "-b", "2048", "-ub", "512", "-np", "4", "-fa", "on", "-ctk", "q8_0",
            "-ctv", "q8_0", "-ngl", "999", "--load-mode", "none", "--seed", "-1", "--jinja", "-lv", "4"]
    assert load_args(tmp_path, args) == ()


@pytest.mark.parametrize(("args", "message"), [
    (["--host", "0.0.0.0"], "args[0]: --host is not on builder's list of llama.cpp tuning flags"),
    (["-t", "2", "--port=9999"], "args[2]: --port is not on builder's list"),
    (["--api-key", "mine"], "args[0]: --api-key is not on builder's list"),
    (["--slots"], "args[0]: --slots is not on builder's list"),
    (["--tools", "all"], "args[0]: --tools is not on builder's list"),
    (["--rpc", "10.0.0.9:50052"], "args[0]: --rpc is not on builder's list"),
    (["-m", "/etc/other.gguf"], "args[0]: -m is not on builder's list"),
    (["--alias", "gpt-4"], "args[0]: --alias is not on builder's list"),
    (["--chat-template-file", "/etc/shadow"], "args[0]: --chat-template-file is not on builder's list"),
    (["-t", "2", "other.gguf"], "args[2]: a positional argument (a second model, a prompt) is not a tuning flag"),
    (["-c"], "args[0]: -c needs a value"),
    (["--jinja=false"], "args[0]: --jinja takes no value"),
])
def test_other_llama_cpp_args_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    with pytest.raises(RecipeError) as error:
        load_args(tmp_path, args)
    assert f"cluster.yaml: services[0].{message}" in error.value.message
    assert "unsafe_args: true" in (error.value.hint or "")


@pytest.mark.parametrize("args", [["--api-key", "k"], ["--host", "0.0.0.0"], ["--served-model-name", "gpt-4"],
                                  ["--trust-remote-code"], ["--allowed-local-media-path", "/"],
                                  ["--middleware", "evil.mw"], ["-cc.cache_dir=/tmp"]])
def test_other_vllm_args_are_one_line(tmp_path: Path, args: list[str]) -> None:
    path = vllm_cluster_file(tmp_path, [vllm(nodes=["a"], args=["--max-num-seqs", "4", *args])])
    with pytest.raises(RecipeError, match=re.escape(f"services[0].args[2]: {args[0].partition('=')[0]} is not on "
                                                    "builder's list of vllm tuning flags")):
        load_cluster(path)


def test_vllm_tuning_flags_pass() -> None:
    assert refused_args("vllm", ["--max-model-len", "4096", "--gpu-memory-utilization", "0.8", "--dtype", "bfloat16",
                                 "--enforce-eager", "-cc.backend=eager", "--enable-prefix-caching"]) == []


@pytest.mark.parametrize(("name", "why"), [
    ("LLAMA_ARG_HOST", "sets the server's arguments"), ("LLAMA_ARG_API_KEY", "sets the server's arguments"),
    ("VLLM_API_KEY", "sets the server's arguments"), ("VLLM_HOST_IP", "sets the server's arguments"),
    ("RAY_ADDRESS", "sets the server's arguments"),
    ("AIP_MODE", "sets the server's arguments"), ("LD_PRELOAD", "is not on builder's list"),
    ("PYTHONPATH", "is not on builder's list"),
])
def test_env_outside_the_list_is_one_line(tmp_path: Path, name: str, why: str) -> None:
    path = cluster_file(tmp_path, nodes=[node("a", 1, env={"OMP_NUM_THREADS": "4", name: "x"}), node("b", 2)])
    with pytest.raises(RecipeError) as error:
        load_cluster(path)
    assert f"cluster.yaml: nodes[0].env.{name}: {name} {why}" in error.value.message


def test_device_env_loads_without_a_warning(tmp_path: Path) -> None:
    env = {"GGML_VK_VISIBLE_DEVICES": "0", "HIP_VISIBLE_DEVICES": "0", "ROCR_VISIBLE_DEVICES": "0",
           "CUDA_VISIBLE_DEVICES": "0", "ONEAPI_DEVICE_SELECTOR": "level_zero:0", "OMP_NUM_THREADS": "8",
           # vLLM's CPU backend is tuned only through these (its KV cache, its threads' cores)
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"}
    assert load_cluster(cluster_file(tmp_path, nodes=[node("a", 1, env=env), node("b", 2)])).warnings == ()


def test_unsafe_lets_them_through_with_one_warning_line_each(tmp_path: Path) -> None:
    warnings = load_cluster(cluster_file(
        tmp_path, nodes=[node("a", 1, env={"LLAMA_ARG_HOST": "0.0.0.0", "OMP_NUM_THREADS": "2"}, unsafe_env=True),
                         node("b", 2)],
        services=[service("chat", nodes=["a"], args=["-t", "2", "--slots", "--api-key", "k"], unsafe_args=True)],
    )).warnings
    assert len(warnings) == 2
    env, args = warnings
    assert env.endswith("nodes[0].unsafe_env: passes LLAMA_ARG_HOST to the node's servers unchecked; they can "
                        "undo builder's bindings")
    assert "services[0].unsafe_args: passes --slots --api-key k to llama.cpp unchecked" in args
    assert all("\n" not in w for w in warnings)


def test_every_llama_cpp_flag_on_the_list_is_one_the_pinned_llama_cpp_has(cpu_prepared: Any) -> None:
    """A llama.cpp bump that renames or drops a tuning flag, or changes whether it takes a value, fails here."""
    source = (cpu_prepared.tree.path / "common" / "arg.cpp").read_text()
    wrong = []
    for flag, takes_value in LLAMA_CPP_FLAGS.items():
        line = next((ln for ln in source.splitlines() if re.search(rf'\{{[^}}]*"{re.escape(flag)}"', ln)), None)
        if line is None:
            wrong.append(f"{flag}: not in common/arg.cpp")
            continue
        # a flag with a value has its value's name right after its names: {"-c", "--ctx-size"}, "N",
        has_value = re.search(r'\}\s*,\s*"[^"]*"\s*,\s*$', line) is not None
        if has_value != takes_value:
            wrong.append(f"{flag}: takes a value in arg.cpp: {has_value}")
    assert wrong == []


def test_the_cli_refuses_in_one_line(tmp_path: Path) -> None:
    path = cluster_file(tmp_path, services=[service("chat", nodes=["a"], args=["--api-key", "k"])])
    proc = run_cli("cluster", "status", "--local", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("error: ") and "cluster.yaml: services[0].args[0]: --api-key" in lines[0]
    assert len(lines) <= 2
