"""`builder cluster commands` for boxes builder does not boot: models named by their sha256 on the box, vLLM
lines (a replicate server, a cpu pipeline's nodes) that `builder run --print` accepts, a Ray pipeline left
out in one line; and `builder run --model-sha256`, which refuses a missing or different model before it even
looks for a container engine (so before any container starts)."""

import hashlib
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.cluster.model import load_cluster
from conftest import run_cli_inproc

WEIGHTS = bytes(range(256)) * 16


def _folder(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}\n')
    (path / "model.safetensors").write_bytes(WEIGHTS)
    (path / "sub" / "tokenizer.json").write_text("{}\n")
    return path


def _folder_hash(path: Path) -> str:
    """The coreutils recipe of docs/clusters.md, written out."""
    lines = "".join(f"{hashlib.sha256((path / name).read_bytes()).hexdigest()}  {name}\n"
                    for name in ("config.json", "model.safetensors", "sub/tokenizer.json"))
    return hashlib.sha256(lines.encode()).hexdigest()


def _node(name: str, last: int, target: str) -> dict[str, Any]:
    return {"name": name, "mac": f"52:54:00:00:00:{last:02x}", "target": target, "memory": "1GiB",
            "address": f"10.0.0.{last}"}


@pytest.fixture
def cluster(tmp_path: Path) -> dict[str, Any]:
    gguf = tmp_path / "chat.gguf"
    gguf.write_bytes(b"GGUF" + bytes(500))
    folder = _folder(tmp_path / "tiny-hf")
    sha, hashed = hashlib.sha256(gguf.read_bytes()).hexdigest(), _folder_hash(folder)
    data = {"control": {"address": "10.0.0.1"},
            "nodes": [_node("a", 11, "cpu"), _node("b", 12, "cpu"), _node("g1", 13, "nvidia"),
                      _node("g2", 14, "nvidia")],
            "services": [
                {"name": "chat", "model": "chat.gguf", "sha256": sha, "nodes": ["a", "g1"]},
                {"name": "llm", "engine": "vllm", "model": "tiny-hf", "sha256": hashed, "nodes": ["g1"],
                 "context": 512},
                {"name": "pipe", "engine": "vllm", "model": "tiny-hf", "sha256": hashed, "topology": "pipeline",
                 "nodes": ["a", "b"], "args": ["--seed", "7"]},
                {"name": "ray", "engine": "vllm", "model": "tiny-hf", "sha256": hashed, "topology": "pipeline",
                 "nodes": ["g1", "g2"]}]}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return {"path": path, "gguf": gguf, "folder": folder, "sha": sha, "hash": hashed}


def test_models_are_named_by_sha256_and_every_line_checks_its_model(cluster: dict[str, Any]) -> None:
    proc = run_cli_inproc("cluster", "commands", str(cluster["path"]), "--models", "/m", "--json")
    assert proc.returncode == 0, proc.stderr
    found = {entry["node"]: entry for entry in json.loads(proc.stdout)}
    sha, hashed = cluster["sha"], cluster["hash"]
    assert found["g1"]["models"] == [
        {"service": "chat", "model": "chat.gguf", "sha256": sha, "path": f"/m/{sha}.gguf"},
        {"service": "llm", "model": "tiny-hf", "sha256": hashed, "path": f"/m/{hashed}"}]
    chat, llm = found["g1"]["argv"]
    assert chat[chat.index("--model-sha256") + 1] == sha and chat[chat.index("-m") + 1] == f"/m/{sha}.gguf"
    assert chat.index("--model-sha256") < chat.index("server")  # builder run's option, not the server's
    assert llm == ["builder", "run", "--flavour", "vllm", "--target", "nvidia", "--detach", "--name", "builder-llm",
                   "--shm-size", "1g", "--env", "VLLM_HOST_IP=10.0.0.13", "--env", "HF_HUB_OFFLINE=1",
                   "--model-sha256", hashed, "serve", f"/m/{hashed}", "--host", "10.0.0.13", "--port", "8204",
                   "--served-model-name", "llm", "--max-model-len", "512"]
    text = run_cli_inproc("cluster", "commands", str(cluster["path"]), "--models", "/m", "--node", "g1").stdout
    assert f"# chat: chat.gguf -> /m/{sha}.gguf" in text.splitlines()
    assert "named by sha256: copy each file below to the path shown" in text


def test_a_cpu_pipeline_joins_as_local_mode_does_and_a_ray_pipeline_is_left_out(cluster: dict[str, Any]) -> None:
    found = {e["node"]: e for e in json.loads(run_cli_inproc("cluster", "commands", str(cluster["path"]),
                                                             "--json").stdout)}
    head = next(a for a in found["a"]["argv"] if "builder-pipe" in a)
    worker, = found["b"]["argv"]
    assert head[head.index("serve"):] == [
        "serve", f"/srv/models/{cluster['hash']}", "--host", "10.0.0.11", "--port", "8779", "--served-model-name",
        "pipe", "--seed", "7", "--pipeline-parallel-size", "2", "--distributed-executor-backend", "mp", "--nnodes",
        "2", "--node-rank", "0", "--master-addr", "10.0.0.11", "--master-port", "29500"]
    assert worker[-7:] == ["--node-rank", "1", "--master-addr", "10.0.0.11", "--master-port", "29500", "--headless"]
    assert "--port" not in worker and worker[worker.index("--name") + 1] == "builder-pipe-pipeline"
    for argv in (head, worker):  # the interface comes from the box's environment, named, never guessed
        assert "GLOO_SOCKET_IFNAME" in argv and not any("IFNAME=" in word for word in argv)
    assert found["a"]["environment"] == found["b"]["environment"] == ["GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"]
    assert found["g1"]["environment"] == [] and found["g2"]["argv"] == []
    assert found["g1"]["not_covered"] == found["g2"]["not_covered"] == ["ray"]
    assert not any("ray" in " ".join(argv) for e in found.values() for argv in e["argv"])
    text = run_cli_inproc("cluster", "commands", str(cluster["path"]), "--node", "g2").stdout.splitlines()
    assert text[1].startswith("# ray: a Ray pipeline; each node's Ray container needs the model folder mounted")
    a = run_cli_inproc("cluster", "commands", str(cluster["path"]), "--node", "a").stdout
    assert "# first: export GLOO_SOCKET_IFNAME=IFACE NCCL_SOCKET_IFNAME=IFACE, IFACE being the interface that " \
           "holds 10.0.0.11" in a


def test_every_line_is_what_builder_run_accepts(cluster: dict[str, Any]) -> None:
    found = json.loads(run_cli_inproc("cluster", "commands", str(cluster["path"]), "--json").stdout)
    lines = [argv for entry in found for argv in entry["argv"]]
    assert len(lines) == 5
    roles = ("server", "rpc-worker", "serve")
    for argv in lines:
        assert argv[:2] == ["builder", "run"]
        target = argv[argv.index("--target") + 1]
        # An image the test names: --print needs no built image (and checks no model: it starts nothing).
        printed = run_cli_inproc("run", "--print", "--image", f"localhost/builder-example:{target}", *argv[2:],
                                 env={"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"})
        assert printed.returncode == 0, printed.stderr
        engine_argv = shlex.split(printed.stdout.strip().splitlines()[-1])
        role = next(i for i, word in enumerate(argv) if word in roles)
        assert engine_argv[-len(argv[role:]):] == argv[role:]
        assert "--model-sha256" not in engine_argv
        if "vllm" in argv:
            assert engine_argv[engine_argv.index("--shm-size") + 1] == "1g"


def test_the_vllm_lines_start_what_local_mode_starts(cluster: dict[str, Any]) -> None:
    """The same `launch()` gives both: only the model's path (the box's, mounted by builder run) differs."""
    from builder.cluster.commands import node_commands
    from builder.cluster.local import Local, process_argv
    from builder.engines import get_engine

    loaded = load_cluster(cluster["path"])
    local = Local.of(loaded)
    process = next(p for p in loaded.processes if p.service == "llm")
    started = process_argv(local, get_engine("podman"), process, "IMAGE", cluster["folder"])
    line = next(a for e in node_commands(loaded, "/m") for a in e.argv if "builder-llm" in a)
    there = started[started.index("IMAGE") + 1:]
    here = list(line[line.index("serve"):])
    assert there[:2] == ["serve", "/models/llm"] and here[:2] == ["serve", f"/m/{cluster['hash']}"]
    assert there[2:] == [w.replace("10.0.0.13", "127.0.0.13") for w in here[2:]]  # local mode's loopback address


NO_ENGINE = "no usable container engine"


def _run(tmp_path: Path, *args: str) -> Any:
    """`builder run` with no container engine on PATH: whatever passes the model check stops at the engine."""
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    return run_cli_inproc("run", "--engine", "podman", "--image", "localhost/builder-example:cpu", "--target", "cpu",
                          *args, env={"PATH": str(empty)})


def test_a_different_or_missing_model_is_refused_before_the_engine(cluster: dict[str, Any], tmp_path: Path) -> None:
    gguf, folder, sha, hashed = cluster["gguf"], cluster["folder"], cluster["sha"], cluster["hash"]
    cases = [
        (["--model-sha256", hashed, "server", "-m", str(gguf)], f"--model-sha256: {gguf} has sha256 {sha}, not "
                                                                 f"{hashed}"),
        (["--model-sha256", sha, "server", f"--model={tmp_path / 'absent.gguf'}"],
         f"--model-sha256: {tmp_path / 'absent.gguf'} is not a file on this machine"),
        (["--model-sha256", sha, "server", "-m", str(folder)],
         f"--model-sha256: {folder} is not a file on this machine"),
        (["--model-sha256", sha, "rpc-worker", "--host", "127.0.0.1"],
         "--model-sha256: the role's arguments name no model"),
        (["--model-sha256", "ABC", "server", "-m", str(gguf)], "--model-sha256: 'ABC' is not a sha256"),
        (["--flavour", "vllm", "--model-sha256", sha, "serve", str(folder)],
         f"--model-sha256: {folder} has content hash {hashed}, not {sha}"),
    ]
    for args, message in cases:
        proc = _run(tmp_path, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.splitlines()[0] == f"error: {message}", proc.stderr
        assert NO_ENGINE not in proc.stderr and "Traceback" not in proc.stderr
    (folder / "sub" / "tokenizer.json").write_text("{ }\n")  # one byte more in one file of the folder
    changed = _run(tmp_path, "--flavour", "vllm", "--model-sha256", hashed, "serve", str(folder))
    assert changed.returncode == 2 and f"{folder} has content hash " in changed.stderr, changed.stderr


def test_the_right_model_passes_the_check(cluster: dict[str, Any], tmp_path: Path) -> None:
    for args in (["--model-sha256", cluster["sha"], "server", "-m", str(cluster["gguf"])],
                 ["--flavour", "vllm", "--model-sha256", cluster["hash"], "serve", str(cluster["folder"])]):
        proc = _run(tmp_path, *args)
        assert NO_ENGINE in proc.stderr and "--model-sha256" not in proc.stderr, proc.stderr


def test_targets_says_where_vllm_services_run() -> None:
    """vLLM images build for cpu and nvidia/cuda; NVIDIA boxes are not netbooted; rocm and sycl are rendered only."""
    text = run_cli_inproc("targets").stdout.split("\n\n")
    scope = next(part for part in text if part.startswith("vLLM services of a cluster file")).splitlines()
    assert scope[1:] == ["  netbooted nodes: cpu/cpu",
                         "  boxes builder does not boot, by `builder cluster commands`: nvidia/cuda",
                         "  not yet: intel-arc/sycl, strix-halo/rocm (their vLLM images are rendered only, until "
                         "locked)"]
