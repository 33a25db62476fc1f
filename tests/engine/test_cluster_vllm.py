"""vLLM services in a cluster file: the model folder's content hash, every refusal as one line, the command lines a
pipeline runs with (Ray on GPU variants, vLLM's own multi-node executor on cpu), and no container started
for a model that fails its hash. The real pipeline over two loopback nodes is in test_cluster_vllm_pipeline.py.
"""

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.cluster.local import Local, process_argv
from builder.cluster.model import load_cluster
from builder.engines import get_engine
from conftest import run_cli

WEIGHTS = bytes(range(256)) * 64  # 16 KiB


def hf_folder(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}\n')
    (path / "model.safetensors").write_bytes(WEIGHTS)
    (path / "sub" / "tokenizer.json").write_text("{}\n")
    return path


def folder_sha(path: Path) -> str:
    lines = "".join(f"{hashlib.sha256((path / name).read_bytes()).hexdigest()}  {name}\n"
                    for name in ("config.json", "model.safetensors", "sub/tokenizer.json"))
    return hashlib.sha256(lines.encode()).hexdigest()


def node(name: str, last: int, target: str = "cpu", **extra: Any) -> dict[str, Any]:
    return {"name": name, "mac": f"52:54:00:12:35:{last:02x}", "target": target, "memory": "1GiB", **extra}


def cluster_file(tmp_path: Path, services: list[dict[str, Any]], nodes: list[dict[str, Any]] | None = None) -> Path:
    if not (tmp_path / "tiny-hf").exists():
        hf_folder(tmp_path / "tiny-hf")
    data = {"nodes": nodes or [node("a", 1), node("b", 2), node("c", 3)], "services": services}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def vllm(name: str = "llm", **extra: Any) -> dict[str, Any]:
    return {"name": name, "engine": "vllm", "model": "tiny-hf", "sha256": "0" * 64, **extra}


def test_hash_model_prints_what_coreutils_computes(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "m")
    proc = run_cli("cluster", "hash-model", "--", str(folder))
    assert proc.returncode == 0, proc.stderr
    coreutils = subprocess.run(["bash", "-c", "cd \"$0\" && find . -type f -printf '%P\\0' | LC_ALL=C sort -z "
                                "| xargs -0 sha256sum | sha256sum", str(folder)],
                               capture_output=True, text=True, check=True).stdout.split()[0]
    assert proc.stdout.strip() == coreutils == folder_sha(folder)
    (folder / "sub" / "tokenizer.json").write_text("{ }\n")
    assert run_cli("cluster", "hash-model", "--", str(folder)).stdout.strip() != coreutils


def test_replicate_and_pipeline_place_servers_and_workers(tmp_path: Path) -> None:
    loaded = load_cluster(cluster_file(tmp_path, [vllm("one", nodes=["a", "b"]),
                                                  vllm("two", topology="pipeline", nodes=["c", "a"], port=9000)]))
    placed = {(p.service, p.node, p.role, p.port) for p in loaded.processes}
    assert placed == {("one", "a", "server", 8537), ("one", "b", "server", 8537),
                      ("two", "c", "server", 9000), ("two", "a", "pipeline-worker", 29500)}


def _argv(tmp_path: Path, nodes: list[dict[str, Any]], service: dict[str, Any]) -> dict[str, list[str]]:
    loaded = load_cluster(cluster_file(tmp_path, [service], nodes))
    local = Local.of(loaded)
    local.state.mkdir(parents=True, exist_ok=True)
    return {p.node: process_argv(local, get_engine("podman"), p, "IMAGE", tmp_path / "tiny-hf")
            for p in loaded.processes}


def test_a_cpu_pipeline_uses_vllms_multi_node_executor_bound_to_each_node(tmp_path: Path) -> None:
    argv = _argv(tmp_path, [node("a", 1), node("b", 2)],
                 vllm(topology="pipeline", nodes=["b", "a"], pipeline_port=29600, context=256, args=["--seed", "7"]))
    head, worker = argv["b"], argv["a"]
    assert head[head.index("IMAGE"):] == [
        "IMAGE", "serve", "/models/llm", "--host", "127.0.0.12", "--port", "8204", "--served-model-name", "llm",
        "--max-model-len", "256", "--seed", "7", "--pipeline-parallel-size", "2", "--distributed-executor-backend",
        "mp", "--nnodes", "2", "--node-rank", "0", "--master-addr", "127.0.0.12", "--master-port", "29600"]
    assert worker[-7:] == ["--node-rank", "1", "--master-addr", "127.0.0.12", "--master-port", "29600",
                           "--headless"]
    assert worker[worker.index("IMAGE"):][:5] == ["IMAGE", "serve", "/models/llm", "--served-model-name", "llm"]
    assert "--port" not in worker  # headless: no API
    assert "VLLM_HOST_IP=127.0.0.11" in worker and "VLLM_HOST_IP=127.0.0.12" in head
    assert "GLOO_SOCKET_IFNAME=lo" in head and f"{tmp_path / 'tiny-hf'}:/models/llm:ro" in head
    assert not any("0.0.0.0" in word or "RAY" in word for word in head + worker)


def test_a_gpu_pipeline_runs_a_ray_head_and_workers_with_a_token_file(tmp_path: Path) -> None:
    nodes = [node("g1", 1, "nvidia"), node("g2", 2, "nvidia"), node("g3", 3, "nvidia")]
    argv = _argv(tmp_path, nodes, vllm(topology="pipeline", nodes=["g1", "g2", "g3"]))
    head, worker = argv["g1"], argv["g3"]
    assert head[head.index("IMAGE"):][:2] == ["IMAGE", "shell"]
    script = head[-1]
    assert script.startswith("ray start --head --node-ip-address 127.0.0.11 --port 29500 ")
    assert "&& exec vllm serve /models/llm --host 127.0.0.11 --port 8204 --served-model-name llm " in script
    assert script.endswith("--pipeline-parallel-size 3 --distributed-executor-backend ray")
    assert worker[worker.index("IMAGE"):] == ["IMAGE", "ray-worker", "--head", "127.0.0.11:29500",
                                              "--host", "127.0.0.13"]
    token_file = Local.of(load_cluster(tmp_path / "cluster.yaml")).state / "ray-token"
    token = token_file.read_text().strip()
    assert len(token) == 64 and token_file.stat().st_mode & 0o077 == 0
    for words in (head, worker):
        assert "RAY_AUTH_TOKEN_PATH=/run/builder/ray-token" in words
        assert f"{token_file}:/run/builder/ray-token:ro" in words
        assert not any(token in word for word in words)
        assert "NCCL_SOCKET_IFNAME=lo" in words


def _escape(tmp_path: Path) -> Path:
    (tmp_path / "secret").write_text("outside\n")
    path = cluster_file(tmp_path, [vllm(nodes=["a"])])
    os.symlink("../../secret", tmp_path / "tiny-hf" / "sub" / "leak.json")
    return path


def _file_not_folder(tmp_path: Path) -> Path:
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    return cluster_file(tmp_path, [vllm(nodes=["a"], model="model.gguf")])


def _no_config(tmp_path: Path) -> Path:
    path = cluster_file(tmp_path, [vllm(nodes=["a"])])
    (tmp_path / "tiny-hf" / "config.json").unlink()
    return path


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: cluster_file(p, [vllm(nodes=["a"], model="missing")]),
     "services[0].model: missing does not exist"),
    (_file_not_folder, "services[0].model: model.gguf is not a folder"),
    (_escape, "services[0].model: sub/leak.json in tiny-hf is a symbolic link (to ../../secret)"),
    (_no_config, "services[0].model: tiny-hf has no config.json"),
    (lambda p: cluster_file(p, [vllm(nodes=["a"], model="https://example.org/m")]),
     "services[0].model: a vLLM service serves a model folder on this machine"),
    (lambda p: cluster_file(p, [{"name": "g", "model": "tiny-hf", "sha256": "0" * 64, "topology": "pipeline",
                                 "nodes": ["a", "b"]}]),
     "services[0].topology: pipeline is vLLM across nodes; llama.cpp spreads a GGUF with split"),
    (lambda p: cluster_file(p, [vllm(topology="split", head="a", workers=["b"])]),
     "services[0].topology: split is llama.cpp's RPC; vLLM spreads a model with pipeline"),
    (lambda p: cluster_file(p, [vllm(topology="pipeline", nodes=["a"])]),
     "services[0].nodes: pipeline needs at least 2 nodes"),
    (lambda p: cluster_file(p, [vllm(nodes=["v"])], [node("v", 1, "strix-halo", variant="vulkan")]),
     "services[0].nodes[0]: node v is strix-halo/vulkan, which has no vLLM recipe"),
    (lambda p: cluster_file(p, [vllm(topology="pipeline", nodes=["a", "g"])], [node("a", 1), node("g", 2, "nvidia")]),
     "services[0].nodes: a pipeline runs one vLLM build on every node, these are cpu/cpu, nvidia/cuda"),
    (lambda p: cluster_file(p, [vllm(topology="pipeline", nodes=["a", "b"], args=["--enforce-eager"])]),
     "services[0].args: --enforce-eager breaks a cpu pipeline"),
    (lambda p: cluster_file(p, [vllm(nodes=["a"])], [node("a", 1, memory="16KiB")]),
     "nodes[0].memory: a has 0.0 GiB but its services need 0.0 GiB"),
])
def test_bad_vllm_service_is_one_line_and_exit_2(tmp_path: Path, make: Any, message: str) -> None:
    proc = run_cli("cluster", "status", "--local", str(make(tmp_path)))
    assert proc.returncode == 2, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("error: ") and "cluster.yaml: " in first and message in first, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 2


def test_default_memory_is_1_2_times_the_folder(tmp_path: Path) -> None:
    size = sum(f.stat().st_size for f in hf_folder(tmp_path / "tiny-hf").rglob("*") if f.is_file())
    fits = int(size * 1.2) + 1
    load_cluster(cluster_file(tmp_path, [vllm(nodes=["a"])], [node("a", 1, memory=str(fits))]))
    proc = run_cli("cluster", "status", "--local", str(cluster_file(tmp_path, [vllm(nodes=["a"])],
                                                                    [node("a", 1, memory=str(fits - 2))])))
    assert proc.returncode == 2 and "nodes[0].memory: a has" in proc.stderr, proc.stderr


@pytest.mark.engine  # asks podman which containers exist
def test_a_wrong_hash_stops_up_before_any_container(tmp_path: Path) -> None:
    path = cluster_file(tmp_path, [vllm(nodes=["a"], sha256="1" * 64)])
    proc = run_cli("cluster", "up", "--local", str(path), "--engine", "podman", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    error = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    assert error == (f"error: cluster.yaml: services[0].sha256: the folder tiny-hf hashes to "
                     f"{folder_sha(tmp_path / 'tiny-hf')}")
    assert "builder cluster hash-model DIR" in proc.stderr and "starting" not in proc.stderr
    status = json.loads(run_cli("cluster", "status", "--local", str(path), "--json").stdout)
    assert status["services"][0]["processes"][0]["container"] == "absent"


def _trick(kind: str, folder: Path) -> None:
    outside = folder.parent / "outside"
    outside.mkdir(exist_ok=True)
    if kind == "absolute link":
        os.symlink(outside, folder / "sub" / "weights")
    elif kind == "linked folder":
        os.symlink("sub", folder / "again")
    elif kind == "fifo":
        os.mkfifo(folder / "pipe")
    elif kind == "newline name":
        (folder / "a\nb.json").write_text("{}")
    elif kind == "backslash name":
        (folder / "a\\b.json").write_text("{}")


@pytest.mark.parametrize(("kind", "message"), [
    ("absolute link", "sub/weights in m is a symbolic link"),
    ("linked folder", "again in m is a symbolic link (to sub)"),
    ("fifo", "pipe in m is not a regular file or folder"),
    ("newline name", "has a control character or backslash in its name"),
    ("backslash name", "has a control character or backslash in its name"),
])
def test_a_model_folder_with_a_trick_is_refused(tmp_path: Path, kind: str, message: str) -> None:
    from builder.cluster.hfmodel import folder_hash
    from builder.core.errors import RecipeError

    folder = hf_folder(tmp_path / "m")
    _trick(kind, folder)
    with pytest.raises(RecipeError) as caught:
        folder_hash(folder, "here", "m")
    assert message in str(caught.value) and "\n" not in str(caught.value)  # one line, the name escaped


def test_the_folder_itself_may_not_be_a_link(tmp_path: Path) -> None:
    from builder.cluster.hfmodel import folder_hash
    from builder.core.errors import RecipeError

    os.symlink(hf_folder(tmp_path / "m"), tmp_path / "link")
    with pytest.raises(RecipeError, match="link is a symbolic link"):
        folder_hash(tmp_path / "link", "here", "link")
