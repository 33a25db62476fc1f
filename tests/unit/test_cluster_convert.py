"""The netboot-only form (nodes with role:, one top-level model) read as services: each conversion rule, each
refusal, the note line, `builder cluster convert`, and nodes builder does not boot."""

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_netboot import MAC, fake_artifacts

from builder.cluster.hfmodel import folder_hash
from builder.cluster.model import Process, load_cluster
from conftest import run_cli_inproc

MAC2, MAC3 = "52:54:00:12:34:57", "52:54:00:12:34:58"
GGUF = b"GGUF tiny model"


def old_file(tmp_path: Path, nodes: list[dict[str, Any]], **top: Any) -> Path:
    (tmp_path / "tiny.gguf").write_bytes(GGUF)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"control": {"address": "10.0.2.2"}, "nodes": nodes, **top}))
    return path


def vllm_folder(tmp_path: Path) -> str:
    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"\0" * 100)
    return folder_hash(folder, "test")


def test_head_and_model_become_a_split_with_the_models_sha256_and_the_old_ports(tmp_path: Path) -> None:
    path = old_file(tmp_path, [{"name": "h", "mac": MAC, "target": "cpu", "role": "head"},
                               {"name": "w1", "mac": MAC2, "target": "cpu", "role": "rpc-worker",
                                "address": "10.0.2.21", "port": 50100},
                               {"name": "w2", "mac": MAC3, "target": "cpu", "role": "rpc-worker",
                                "address": "10.0.2.22", "port": 50100}], model="tiny.gguf", context=512)
    loaded = load_cluster(path)
    (service,) = loaded.cluster.services
    assert (service.name, service.topology, service.head, service.workers) == ("tiny", "split", "h", ["w1", "w2"])
    assert service.sha256 == hashlib.sha256(GGUF).hexdigest() and service.context == 512
    assert loaded.processes == (Process("tiny", "h", "server", 8080), Process("tiny", "w1", "rpc-worker", 50100),
                                Process("tiny", "w2", "rpc-worker", 50100))
    assert all(n.memory == 1 << 30 for n in loaded.cluster.nodes)  # 1.2 × the model, rounded up to a GiB
    assert loaded.notes == (f"{path} uses the netboot-only form (nodes with role:); read as services: "
                            f"`builder cluster convert {path}` prints it in the services form (docs/clusters.md)",)


def test_a_lone_head_is_a_replica_and_workers_alone_are_a_split_without_head(tmp_path: Path) -> None:
    lone = load_cluster(old_file(tmp_path, [{"name": "h", "mac": MAC, "target": "cpu", "role": "head", "port": 9000}],
                                 model="tiny.gguf"))
    assert lone.processes == (Process("tiny", "h", "server", 9000),)
    workers = load_cluster(old_file(tmp_path, [{"name": "w", "mac": MAC, "target": "cpu", "role": "rpc-worker"}]))
    (service,) = workers.cluster.services
    assert service.head is None and service.model == "" and service.workers == ["w"]
    assert workers.processes == (Process("rpc-workers", "w", "rpc-worker", 50052),)


def test_vllm_servers_become_replicate_vllm_services(tmp_path: Path) -> None:
    sha = vllm_folder(tmp_path)
    serve = {"model": "hf", "served_name": "tiny-llama", "args": ["--dtype", "float32"], "kv_cache_gib": 2}
    loaded = load_cluster(old_file(tmp_path, [
        {"name": "v1", "mac": MAC, "target": "cpu", "role": "vllm-server", "vllm": serve},
        {"name": "v2", "mac": MAC2, "target": "cpu", "role": "vllm-server", "vllm": serve}]))
    (service,) = loaded.cluster.services
    assert (service.name, service.engine, service.topology, service.nodes) == ("tiny-llama", "vllm", "replicate",
                                                                               ["v1", "v2"])
    assert service.sha256 == sha and service.args == ["--dtype", "float32"] and service.port == 8000
    assert all(n.env == {"VLLM_CPU_KVCACHE_SPACE": "2"} for n in loaded.cluster.nodes)


@pytest.mark.parametrize(("nodes", "top", "message"), [
    ([{"name": "h", "mac": MAC, "target": "cpu", "role": "head"},
      {"name": "w", "mac": MAC2, "target": "cpu", "role": "rpc-worker", "address": "10.0.2.21"}],
     {"model": "http://10.0.2.2:9000/m.gguf"},
     "model: http://10.0.2.2:9000/m.gguf is a URL, and a service's model needs its sha256, which this form cannot "
     "say"),
    ([{"name": "w1", "mac": MAC, "target": "cpu", "role": "rpc-worker"},
      {"name": "w2", "mac": MAC2, "target": "cpu", "role": "rpc-worker", "port": 50100}], {},
     "nodes[1].port: the workers of one service share one port, and these have 50052, 50100"),
    ([{"name": "h", "mac": MAC, "target": "cpu", "role": "head"},
      {"name": "g", "mac": MAC2, "target": "cpu", "role": "head"}], {"model": "tiny.gguf"},
     "nodes[1].role: only one head per cluster (nodes[0] is one)"),
    ([{"name": "h", "mac": MAC, "target": "cpu", "role": "head"}], {}, "model: the head (nodes[0]) needs a model"),
    ([{"name": "v", "mac": MAC, "target": "cpu", "role": "vllm-server"}], {},
     "nodes[0].vllm: a vllm-server node needs `vllm:` (its model)"),
    ([{"name": "v", "mac": MAC, "target": "cpu", "role": "vllm-server",
       "vllm": {"model": "nowhere", "served_name": "x"}}], {}, "nodes[0].vllm.model: nowhere does not exist"),
])
def test_what_cannot_be_converted_is_one_line_with_how_to_rewrite_it(
        tmp_path: Path, nodes: list[dict[str, Any]], top: dict[str, Any], message: str) -> None:
    proc = run_cli_inproc("cluster", "convert", str(old_file(tmp_path, nodes, **top)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("error: ") and message in first, proc.stderr
    if "URL" in message:
        assert "write the file with services:" in proc.stderr and "sha256:" in proc.stderr


def test_cluster_convert_prints_a_services_file_that_loads_the_same(tmp_path: Path) -> None:
    path = old_file(tmp_path, [{"name": "h", "mac": MAC, "target": "cpu", "role": "head", "address": "10.0.2.20"},
                               {"name": "w", "mac": MAC2, "target": "cpu", "role": "rpc-worker",
                                "address": "10.0.2.21"}], model="tiny.gguf", kernel_args=["console=ttyS0"])
    proc = run_cli_inproc("cluster", "convert", str(path))
    assert proc.returncode == 0, proc.stderr
    new = tmp_path / "services.yaml"
    new.write_text(proc.stdout)
    assert "services" in yaml.safe_load(proc.stdout) and "role" not in proc.stdout
    before, after = load_cluster(path), load_cluster(new)
    assert after.notes == () and (after.cluster, after.processes) == (before.cluster, before.processes)
    as_json = json.loads(run_cli_inproc("cluster", "convert", "--json", str(path)).stdout)
    assert as_json == yaml.safe_load(proc.stdout)
    # a services-form file is printed as it is
    again = run_cli_inproc("cluster", "convert", str(new))
    assert yaml.safe_load(again.stdout) == yaml.safe_load(proc.stdout)
    schema = run_cli_inproc("cluster", "schema", "--form", "netboot")
    assert schema.returncode == 2 and "builder cluster convert FILE" in schema.stderr


def test_pxe_publish_says_the_file_was_converted_once_published(tmp_path: Path) -> None:
    path = old_file(tmp_path, [{"name": "w", "mac": MAC, "target": "cpu", "role": "rpc-worker"}])
    folder, _ = fake_artifacts(tmp_path, "a")
    (tmp_path / "sets").mkdir()
    folder.rename(tmp_path / "sets" / "cpu-cpu")
    proc = run_cli_inproc("pxe", "publish", str(path), "--root", str(tmp_path / "pxe-root"),
                          "--artifacts", str(tmp_path / "sets"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"note: {path} uses the netboot-only form (nodes with role:)")
    assert f"  w            {MAC}  rpc-worker rpc-workers  cpu  nodes/52-54-00-12-34-56.ipxe" in proc.stdout


def test_nodes_without_mac_are_not_netbooted_and_point_at_cluster_commands(tmp_path: Path) -> None:
    """A head on the control node (an installed box) with netbooted workers: only the workers get boot files."""
    (tmp_path / "tiny.gguf").write_bytes(GGUF)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({
        "control": {"address": "10.0.2.2"},
        "nodes": [{"name": "box", "target": "nvidia", "address": "10.0.2.2", "memory": "8GiB"},
                  {"name": "w", "mac": MAC, "target": "cpu", "address": "10.0.2.21", "memory": "1GiB"}],
        "services": [{"name": "tiny", "model": "tiny.gguf", "sha256": hashlib.sha256(GGUF).hexdigest(),
                      "topology": "split", "head": "box", "workers": ["w"]}]}))
    folder, _ = fake_artifacts(tmp_path, "a")
    (tmp_path / "sets").mkdir()
    folder.rename(tmp_path / "sets" / "cpu-cpu")
    root = tmp_path / "pxe-root"
    proc = run_cli_inproc("pxe", "publish", str(path), "--root", str(root), "--artifacts", str(tmp_path / "sets"))
    assert proc.returncode == 0, proc.stderr
    assert f"  box          not netbooted      server tiny  nvidia  `builder cluster commands {path}` prints what " \
        "to run there" in proc.stdout
    assert sorted(p.name for p in (root / "current" / "nodes").iterdir()) == [
        "52-54-00-12-34-56.ipxe", "52-54-00-12-34-56.nft", "52-54-00-12-34-56.plan"]
    assert "box" not in json.loads((root / "current" / "nodes.json").read_text())
    nobody = json.loads(json.dumps(yaml.safe_load(path.read_text())))
    del nobody["nodes"][1]["mac"]
    path.write_text(yaml.safe_dump(nobody))
    proc = run_cli_inproc("pxe", "publish", str(path), "--root", str(root), "--artifacts", str(tmp_path / "sets"))
    assert proc.returncode == 2 and "nodes: no node has a mac:, so builder boots none of them" in proc.stderr
