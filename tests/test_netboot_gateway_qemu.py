"""A services-form cluster netbooted for real: a QEMU node (TCG, user-mode networking) boots from
`builder pxe publish`'s generation as a replica of a service, and `builder cluster up` (without --local) starts
the gateway on this, the control node; its health check puts the node in rotation and a completion through it
answers with the tiny model's text.

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
from containers import PROMPT, cpu_reference_text
from qemu import node, wait_for

pytestmark = pytest.mark.engine
__all__ = ["artifacts"]  # the module's fixture, shared with test_netboot_qemu


def test_netbooted_replica_joins_the_gateway_and_answers_through_it(
    tiny_model: Path, tmp_path: Path, artifacts: dict[str, object]
) -> None:
    expected = cpu_reference_text("podman", tmp_path, tiny_model)
    http, server, gateway, metrics = free_port(), free_port(), free_port(), free_port()
    model = tmp_path / "tiny.gguf"
    shutil.copyfile(tiny_model, model)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    nodes: list[dict[str, object]] = [
        # 127.0.0.1: where the gateway reaches the node, through QEMU's hostfwd of the service's port
        {"name": "node1", "mac": MAC, "target": "cpu", "memory": "512MiB", "address": "127.0.0.1"}]
    services = [{"name": "tiny", "model": "tiny.gguf", "sha256": digest, "topology": "replicate",
                 "nodes": ["node1"], "port": server, "context": 256}]
    console = tmp_path / "console.log"
    path = tmp_path / "cluster.yaml"
    with published(tmp_path, http, nodes, services=services,
                   gateway={"address": "127.0.0.1", "port": gateway, "metrics_port": metrics}) as root, \
            node(root / "tftp", MAC, console, forward=(server, server)) as vm:
        words = (root / "current" / "nodes" / "52-54-00-12-34-56.ipxe").read_text().split()
        assert not any(w.startswith("builder.role=") for w in words)
        ready = wait_for(console, r"builder-node: node1 server tiny ready on (\S+)", vm, BOOT_SECONDS)
        assert ready.group(1) == f"10.0.2.15:{server}"  # the node's own leased address, never a wildcard
        text = console.read_text(errors="replace")
        assert "builder-node: node plan verified: sha256 " in text
        assert f"builder-node: model verified: sha256 {digest}" in text

        up = run_cli("cluster", "up", str(path), "--timeout", "120", timeout=300)
        try:
            assert up.returncode == 0, up.stdout + up.stderr
            lines = dict(line.split(None, 1) for line in up.stdout.splitlines() if line.strip())
            assert lines["endpoint"] == f"http://127.0.0.1:{gateway}/v1" and lines["models"] == "tiny"
            key = Path(lines["key"].split()[0]).read_text().strip()
            auth = {"Authorization": f"Bearer {key}"}

            status = run_cli("cluster", "status", str(path), "--json")
            assert status.returncode == 0, status.stderr
            document = json.loads(status.stdout)
            assert document["gateway"]["running"] is True
            [process] = document["services"][0]["processes"]
            assert (process["node"], process["role"], process["address"], process["health"]) == \
                ("node1", "server", f"127.0.0.1:{server}", "UP")
            assert process["last_check"] == "L7OK"
            assert "node1        server     127.0.0.1:" in run_cli("cluster", "status", str(path)).stdout

            resp = requests.post(f"http://127.0.0.1:{gateway}/v1/completions", json={**PROMPT, "model": "tiny"},
                                 headers=auth, timeout=300)
            assert resp.status_code == 200, resp.text
            assert resp.json()["choices"][0]["text"] == expected
            listed = requests.get(f"http://127.0.0.1:{gateway}/v1/models", headers=auth, timeout=30).json()
            assert [m["id"] for m in listed["data"]] == ["tiny"]
            # the node's llama-server runs as local mode runs it: the service's name as alias, with metrics
            direct = requests.get(f"http://127.0.0.1:{server}/v1/models", timeout=30).json()
            assert direct["data"][0]["id"] == "tiny"
            assert "llamacpp:" in requests.get(f"http://127.0.0.1:{server}/metrics", timeout=30).text
            refused = requests.post(f"http://127.0.0.1:{gateway}/v1/completions", json={**PROMPT, "model": "tiny"},
                                    timeout=30)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        finally:
            down = run_cli("cluster", "down", str(path))
        assert down.returncode == 0 and "removed gateway" in down.stdout, down.stdout + down.stderr
        after = json.loads(run_cli("cluster", "status", str(path), "--json").stdout)
        assert after["gateway"]["running"] is False
