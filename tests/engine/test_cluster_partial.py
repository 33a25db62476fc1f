"""A cluster with a node that is off still serves: `builder cluster up` (netbooted nodes, the real HAProxy on the
control node) serves the healthy servers after --timeout and names each one DOWN; `--strict` refuses instead.

Node a is a real llama-server (the cpu image) on 127.0.0.1; node b, at 127.0.0.2, is a board that never booted:
nothing answers there.
"""

import hashlib
import json
from pathlib import Path

import pytest
import requests
import yaml

from conftest import free_port, run_cli
from containers import PROMPT, container, wait_healthy

pytestmark = pytest.mark.engine


def test_a_node_that_is_off_leaves_the_rest_serving_and_strict_refuses(
        tiny_model: Path, llama_cpu_image: str, tmp_path: Path) -> None:
    chat, other, gateway, metrics = (free_port() for _ in range(4))
    data = {"control": {"address": "10.0.2.2"},
            "gateway": {"address": "127.0.0.1", "port": gateway, "metrics_port": metrics},
            "nodes": [{"name": "a", "mac": "52:54:00:12:35:01", "target": "cpu", "memory": "1GiB",
                       "address": "127.0.0.1"},
                      {"name": "b", "mac": "52:54:00:12:35:02", "target": "cpu", "memory": "1GiB",
                       "address": "127.0.0.2"}],
            "services": [{"name": "chat", "model": str(tiny_model), "nodes": ["a", "b"], "port": chat,
                          "sha256": hashlib.sha256(tiny_model.read_bytes()).hexdigest()},
                         {"name": "other", "model": str(tiny_model), "nodes": ["b"], "port": other,
                          "sha256": hashlib.sha256(tiny_model.read_bytes()).hexdigest()}]}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    name = f"builder-test-partial-{chat}"
    with container("podman", tmp_path, name, "server", "-m", str(tiny_model), "-c", "256", "--host", "127.0.0.1",
                   "--port", str(chat), "--alias", "chat") as server:
        wait_healthy(chat, server, tmp_path / f"{name}.log", seconds=180)
        up = run_cli("cluster", "up", str(path), "--timeout", "5", timeout=120)
        try:
            assert up.returncode == 0, up.stderr
            assert f"warning: chat on b (127.0.0.2:{chat}) is DOWN after 5 s" in up.stderr
            assert f"warning: other on b (127.0.0.2:{other}) is DOWN after 5 s" in up.stderr
            assert "warning: serving with 1 of 3 servers" in up.stderr
            key = Path(dict(line.split(None, 1) for line in up.stdout.splitlines())["key"].split()[0]).read_text()
            auth = {"Authorization": f"Bearer {key.strip()}"}
            served = requests.post(f"http://127.0.0.1:{gateway}/v1/completions", json={**PROMPT, "model": "chat"},
                                   headers=auth, timeout=120)
            assert served.status_code == 200 and served.json()["choices"][0]["text"], served.text
            down = requests.post(f"http://127.0.0.1:{gateway}/v1/completions", json={**PROMPT, "model": "other"},
                                 headers=auth, timeout=60)
            assert down.status_code == 503 and down.json()["error"]["code"] == "service_unavailable", down.text
            status = run_cli("cluster", "status", str(path), "--json")
            document = json.loads(status.stdout)
            assert status.returncode == 1 and document["gateway"]["running"] is True
            assert document["problems"] == ["chat server on b is DOWN", "other server on b is DOWN"]
        finally:
            assert run_cli("cluster", "down", str(path)).returncode == 0

        strict = run_cli("cluster", "up", str(path), "--timeout", "5", "--strict", timeout=120)
        assert strict.returncode == 1 and "Traceback" not in strict.stderr, strict.stderr
        assert f"chat on b (127.0.0.2:{chat}) is not healthy after 5 s (2 of 3 servers waiting)" in strict.stderr
        assert json.loads(run_cli("cluster", "status", str(path), "--json").stdout)["gateway"]["running"] is False
