"""A services-form cluster netbooted for real: a QEMU node (TCG, user-mode networking) boots from
`builder pxe publish`'s generation as a replica of two services (two llama-servers of one GGUF, each under its
own name and port), and `builder cluster up` (without --local) starts the gateway on this, the control node;
its health checks put both in rotation and a completion through it answers with the tiny model's text for
each service's name.

QEMU's user-mode network is private to the process, so the node is reached the way QEMU allows: a hostfwd of
the service's port from the host's 127.0.0.1 to the guest. The node's `address` in the cluster file is what
its peers and the gateway connect to (the node binds its own leased address whatever the file says), so the
file gives 127.0.0.1 and the service a port of its own; the gateway binds 127.0.0.1 (gateway.address), while
the nodes fetch their boot files from control.address, 10.0.2.2 (the host as QEMU's guest sees it).
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import requests
from test_netboot_qemu import BOOT_SECONDS, MAC, artifacts, published

from conftest import free_port, run_cli
from containers import PROMPT, container, cpu_reference_text
from qemu import node, wait_for

pytestmark = pytest.mark.engine
__all__ = ["artifacts"]  # the module's fixture, shared with test_netboot_qemu


def test_netbooted_replica_joins_the_gateway_and_answers_through_it(
    tiny_model: Path, tmp_path: Path, artifacts: dict[str, object]
) -> None:
    expected = cpu_reference_text("podman", tmp_path, tiny_model)
    http, server, other, gateway, metrics = (free_port() for _ in range(5))
    model = tmp_path / "tiny.gguf"
    shutil.copyfile(tiny_model, model)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    nodes: list[dict[str, object]] = [
        # 127.0.0.1: where the gateway reaches the node, through QEMU's hostfwd of the service's port
        {"name": "node1", "mac": MAC, "target": "cpu", "memory": "512MiB", "address": "127.0.0.1"}]
    services = [{"name": name, "model": "tiny.gguf", "sha256": digest, "topology": "replicate",
                 "nodes": ["node1"], "port": port, "context": 256} for name, port in (("tiny", server),
                                                                                      ("tiny-b", other))]
    console = tmp_path / "console.log"
    path = tmp_path / "cluster.yaml"
    with published(tmp_path, http, nodes, services=services,
                   gateway={"address": "127.0.0.1", "port": gateway, "metrics_port": metrics}) as root, \
            node(root / "tftp", MAC, console, forward=(server, server),
                 hostfwd=(f"tcp:127.0.0.1:{other}-:{other}",)) as vm:
        words = (root / "current" / "nodes" / "52-54-00-12-34-56.ipxe").read_text().split()
        assert not any(w.startswith("builder.role=") for w in words)
        ready = wait_for(console, r"builder-node: node1 server tiny ready on (\S+)", vm, BOOT_SECONDS)
        assert ready.group(1) == f"10.0.2.15:{server}"  # the node's own leased address, never a wildcard
        ready = wait_for(console, r"builder-node: node1 server tiny-b ready on (\S+)", vm, 120)
        assert ready.group(1) == f"10.0.2.15:{other}"
        text = console.read_text(errors="replace")
        assert "builder-node: node plan verified: sha256 " in text
        assert text.count(f"builder-node: model verified: sha256 {digest}") == 1  # one download for both

        up = run_cli("cluster", "up", str(path), "--timeout", "120", timeout=300)
        try:
            assert up.returncode == 0, up.stdout + up.stderr
            lines = dict(line.split(None, 1) for line in up.stdout.splitlines() if line.strip())
            assert lines["endpoint"] == f"http://127.0.0.1:{gateway}/v1" and lines["models"] == "tiny, tiny-b"
            key = Path(lines["key"].split()[0]).read_text().strip()
            auth = {"Authorization": f"Bearer {key}"}

            status = run_cli("cluster", "status", str(path), "--json")
            assert status.returncode == 0, status.stderr
            document = json.loads(status.stdout)
            assert document["gateway"]["running"] is True
            assert [(s["name"], [(p["node"], p["role"], p["address"], p["health"], p["last_check"])
                                 for p in s["processes"]]) for s in document["services"]] == [
                ("tiny", [("node1", "server", f"127.0.0.1:{server}", "UP", "L7OK")]),
                ("tiny-b", [("node1", "server", f"127.0.0.1:{other}", "UP", "L7OK")])]
            assert document["nodes"] == [{"name": "node1", "address": "127.0.0.1", "target": "cpu", "mac": MAC}]
            text = run_cli("cluster", "status", str(path)).stdout
            assert "node     node1        127.0.0.1" in text and "  node1        server     127.0.0.1:" in text

            for name, port in (("tiny", server), ("tiny-b", other)):
                resp = requests.post(f"http://127.0.0.1:{gateway}/v1/completions", json={**PROMPT, "model": name},
                                     headers=auth, timeout=300)
                assert resp.status_code == 200, resp.text
                assert resp.json()["choices"][0]["text"] == expected
                # each llama-server runs as local mode runs it: the service's name as alias, with metrics
                direct = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()
                assert direct["data"][0]["id"] == name
                assert "llamacpp:" in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
            listed = requests.get(f"http://127.0.0.1:{gateway}/v1/models", headers=auth, timeout=30).json()
            assert [m["id"] for m in listed["data"]] == ["tiny", "tiny-b"]
            refused = requests.post(f"http://127.0.0.1:{gateway}/v1/completions", json={**PROMPT, "model": "tiny"},
                                    timeout=30)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        finally:
            down = run_cli("cluster", "down", str(path))
        assert down.returncode == 0 and "removed gateway" in down.stdout, down.stdout + down.stderr
        after = json.loads(run_cli("cluster", "status", str(path), "--json").stdout)
        assert after["gateway"]["running"] is False


def test_netbooted_split_head_uses_its_worker_and_answers_through_the_gateway(
    tiny_model: Path, tmp_path: Path, artifacts: dict[str, object]
) -> None:
    """A split service netbooted: the QEMU node is its head (llama-server with --rpc from the node's plan), its
    RPC worker another node, here a container on the host, which the guest reaches as 10.0.2.2. Through the
    gateway the greedy text equals the single-node text and the worker served the head. (`status` is not run:
    it would probe the worker at 10.0.2.2 from the host, outside QEMU's private network.)"""
    expected = cpu_reference_text("podman", tmp_path, tiny_model)
    http, server, rpc, gateway, metrics = (free_port() for _ in range(5))
    model = tmp_path / "tiny.gguf"
    shutil.copyfile(tiny_model, model)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    nodes: list[dict[str, object]] = [
        {"name": "head1", "mac": MAC, "target": "cpu", "memory": "512MiB", "address": "127.0.0.1"},
        # stands for a worker node: the host's container, at 10.0.2.2 to the guest
        {"name": "worker1", "mac": "52:54:00:12:34:57", "target": "cpu", "memory": "512MiB", "address": "10.0.2.2"}]
    services = [{"name": "tiny", "model": "tiny.gguf", "sha256": digest, "topology": "split", "head": "head1",
                 "workers": ["worker1"], "port": server, "rpc_port": rpc, "context": 256}]
    console = tmp_path / "console.log"
    path = tmp_path / "cluster.yaml"
    worker = f"builder-netboot-split-worker-{rpc}"
    with published(tmp_path, http, nodes, services=services,
                   gateway={"address": "127.0.0.1", "port": gateway, "metrics_port": metrics}) as root, \
            container("podman", tmp_path, worker, "rpc-worker", "--host", "127.0.0.1", "--port", str(rpc)), \
            node(root / "tftp", MAC, console, forward=(server, server)) as vm:
        ready = wait_for(console, r"builder-node: head1 server tiny ready on (\S+)", vm, BOOT_SECONDS)
        assert ready.group(1) == f"10.0.2.15:{server}"
        up = run_cli("cluster", "up", str(path), "--timeout", "120", timeout=300)
        try:
            assert up.returncode == 0, up.stdout + up.stderr
            lines = dict(line.split(None, 1) for line in up.stdout.splitlines() if line.strip())
            key = Path(lines["key"].split()[0]).read_text().strip()
            resp = requests.post(f"http://127.0.0.1:{gateway}/v1/completions", json={**PROMPT, "model": "tiny"},
                                 headers={"Authorization": f"Bearer {key}"}, timeout=300)
            assert resp.status_code == 200, resp.text
            assert resp.json()["choices"][0]["text"] == expected
        finally:
            down = run_cli("cluster", "down", str(path))
        assert down.returncode == 0, down.stdout + down.stderr
        worker_log = (tmp_path / f"{worker}.log").read_text(errors="replace")
        assert "Accepted client connection" in worker_log, worker_log[-2000:]
