"""vLLM services on netbooted nodes without booting them: what publish writes (the model folder packed into one
squashfs blob by sha256, the same bytes every time; the node's plan holding vLLM's command line as
builder/cluster/vllm_service.py makes it for every vLLM process; the vLLM image's netboot set) and the refusals.
The boot itself is tests/qemu/test_netboot_vllm_qemu.py."""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml
from test_netboot import MAC, fake_artifacts

from builder.cluster.hfmodel import folder_hash
from builder.cluster.plans import load_for_netboot, models, publish_services
from builder.netboot.plan import EnvLine, RpcWorkerLine, VllmLine, parse
from conftest import run_cli_inproc

MAC2 = "52:54:00:12:34:57"


def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    return folder


def cluster_file(tmp_path: Path, service: dict[str, object] | None = None, alone: bool = False,
                 **changes: object) -> Path:
    """v1 serves a vLLM replicate service (its KV cache size in its env), w1 is an RPC worker of a head that runs
    outside the file (unless `alone`)."""
    sha = folder_hash(model_folder(tmp_path), "test")
    data: dict[str, object] = {
        "control": {"address": "10.0.2.2", "http_port": 8000},
        "nodes": [{"name": "v1", "mac": MAC, "target": "cpu", "memory": "4GiB", "address": "10.0.2.30",
                   "env": {"VLLM_CPU_KVCACHE_SPACE": "2"}},
                  {"name": "w1", "mac": MAC2, "target": "cpu", "address": "10.0.2.31"}],
        "services": [{"name": "tiny-llama", "engine": "vllm", "model": "tiny", "sha256": sha, "nodes": ["v1"],
                      "port": 8000, "args": ["--dtype", "float32", "--enforce-eager"], **(service or {})},
                     {"name": "outside", "topology": "split", "workers": ["w1"]}],
    }
    data.update(changes)
    if alone:
        data["services"] = data["services"][:1]  # type: ignore[index]
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def publish(tmp_path: Path, path: Path) -> tuple[Path, dict[str, object], dict[str, object]]:
    root = tmp_path / "pxe-root"
    loaded = load_for_netboot(path)
    folder, manifest = fake_artifacts(tmp_path, f"l{len(list(tmp_path.glob('artifacts-*')))}")
    vfolder, vmanifest = fake_artifacts(tmp_path, f"v{len(list(tmp_path.glob('artifacts-*')))}")
    publish_services(root, loaded, models(loaded, lambda _: None),
                     {("cpu", "cpu"): (folder, manifest), ("cpu", "vllm-cpu"): (vfolder, vmanifest)}, 1)
    return root, manifest, vmanifest


def node_file(root: Path, mac: str, suffix: str) -> str:
    return (root / "current" / "nodes" / f"{mac.replace(':', '-')}.{suffix}").read_text()


def test_vllm_plan_line_carries_the_model_by_hash_and_vllms_command_line(tmp_path: Path) -> None:
    root, manifest, vmanifest = publish(tmp_path, cluster_file(tmp_path))
    words = node_file(root, MAC, "ipxe").split()
    assert not any(w.startswith(("builder.role=", "builder.model=", "builder.served_name=")) for w in words)
    # the vLLM node boots the vLLM image's set, the worker the llama.cpp one
    assert f"builder.sha256={vmanifest['files']['root.squashfs']['sha256']}" in words  # type: ignore[index]
    assert f"builder.sha256={manifest['files']['root.squashfs']['sha256']}" in node_file(root, MAC2, "ipxe")
    plan = parse(node_file(root, MAC, "plan"))
    env, line = plan.lines
    assert env == EnvLine("VLLM_CPU_KVCACHE_SPACE", "2") and isinstance(line, VllmLine)
    digest = line.model_sha256
    assert line == VllmLine("tiny-llama", 8000, f"http://10.0.2.2:8000/blobs/sha256/{digest}", digest,
                            "/models/tiny-llama", (("VLLM_HOST_IP", "10.0.2.30"), ("HF_HUB_OFFLINE", "1")),
                            ("serve", "/models/tiny-llama", "--host", "10.0.2.30", "--port", "8000",
                             "--served-model-name", "tiny-llama", "--dtype", "float32", "--enforce-eager"))
    blob = root / "blobs" / "sha256" / digest
    assert f"builder.models={digest}:{blob.stat().st_size}" in words  # room on a cache disk
    listing = subprocess.run(["unsquashfs", "-l", "-d", "", str(blob)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert sorted(p for p in listing if p.startswith("/")) == ["/config.json", "/model.safetensors"]
    assert parse(node_file(root, MAC2, "plan")).lines == (RpcWorkerLine("outside", 50052),)
    # The same files give the same blob (packed anew once the cache of packed models does not hold it).
    (tmp_path / "tiny" / "model.safetensors").touch()
    root, _, _ = publish(tmp_path, cluster_file(tmp_path))
    assert parse(node_file(root, MAC, "plan")).lines[1] == line


def test_cpu_pipeline_netboots_with_vllms_own_executor(tmp_path: Path) -> None:
    """A cpu pipeline over two netbooted nodes: the first serves, the second runs headless (probed by nobody),
    both from the same command lines `cluster up --local` uses; each node's firewall names the pipeline port."""
    nodes = [{"name": "v1", "mac": MAC, "target": "cpu", "memory": "4GiB", "address": "10.0.2.30"},
             {"name": "v2", "mac": MAC2, "target": "cpu", "memory": "4GiB", "address": "10.0.2.31"}]
    path = cluster_file(tmp_path, {"topology": "pipeline", "nodes": ["v1", "v2"], "args": []}, alone=True,
                        nodes=nodes)
    root, _, vmanifest = publish(tmp_path, path)
    first, second = (parse(node_file(root, mac, "plan")).lines[0] for mac in (MAC, MAC2))
    assert isinstance(first, VllmLine) and isinstance(second, VllmLine)
    assert first.port == 8000 and second.port is None
    common = ("--pipeline-parallel-size", "2", "--distributed-executor-backend", "mp", "--nnodes", "2")
    assert " ".join(common) in " ".join(first.argv) and "--node-rank 0 --master-addr 10.0.2.30" in " ".join(first.argv)
    assert second.argv[-1] == "--headless" and "--node-rank 1 --master-addr 10.0.2.30" in " ".join(second.argv)
    assert ("VLLM_HOST_IP", "10.0.2.31") in second.env
    assert "backend ports (29500)" in node_file(root, MAC2, "nft")
    for mac in (MAC, MAC2):
        assert f"builder.sha256={vmanifest['files']['root.squashfs']['sha256']}" in node_file(root, mac, "ipxe")


def test_pxe_publish_no_longer_sends_vllm_services_elsewhere(tmp_path: Path) -> None:
    (tmp_path / "sets").mkdir()
    proc = run_cli_inproc("pxe", "publish", str(cluster_file(tmp_path)), "--root", str(tmp_path / "pxe-root"),
                          "--artifacts", str(tmp_path / "sets"))
    assert "do not netboot yet" not in proc.stderr and "try it with --local" not in proc.stderr
    assert proc.returncode == 2 and "sets/cpu-cpu" in proc.stderr, proc.stderr  # only the netboot sets are missing


@pytest.mark.parametrize(("change", "message"), [
    ({"nodes": [{"name": "v1", "mac": MAC, "target": "cpu", "memory": "4GiB", "address": "10.0.2.30"},
                {"name": "w1", "mac": MAC2, "target": "cpu", "address": "10.0.2.31"}],
      "extra": {"name": "chat", "model": "chat.gguf", "nodes": ["v1"]}},
     "nodes[0]: v1 hosts llama.cpp and vLLM services, and a netbooted node boots one image"),
    ({"nodes": [{"name": "v1", "mac": MAC, "target": "cpu", "memory": "4GiB"},
                {"name": "w1", "mac": MAC2, "target": "cpu", "address": "10.0.2.31"}]},
     "nodes[0].address: v1 needs one: its vLLM server binds that address"),
    ({"link": True}, "services[0].model: config.json in tiny is a symbolic link"),
])
def test_bad_vllm_netboot_is_one_line_and_exit_2(tmp_path: Path, change: dict[str, object], message: str) -> None:
    path = cluster_file(tmp_path)
    data = yaml.safe_load(path.read_text())
    if "nodes" in change:
        data["nodes"] = change["nodes"]
    if "extra" in change:
        (tmp_path / "chat.gguf").write_bytes(b"GGUF chat")
        sha = hashlib.sha256(b"GGUF chat").hexdigest()
        data["services"].append({**change["extra"], "sha256": sha, "port": 9000})  # type: ignore[dict-item]
    if "link" in change:
        (tmp_path / "tiny" / "config.json").rename(tmp_path / "config.json")
        (tmp_path / "tiny" / "config.json").symlink_to(tmp_path / "config.json")
    path.write_text(yaml.safe_dump(data))
    proc = run_cli_inproc("pxe", "publish", str(path), "--root", str(tmp_path / "pxe-root"))
    assert proc.returncode == 2, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("error: ") and message in first, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "pxe-root").exists()
