"""A netbooted node keeps a server whose device is missing out of the gateway's rotation: the real HAProxy asks
the node's agent (builder-agent.service runs it from images/netboot/plan.sh; here from that file on loopback)
with agent-check, and the agent answers `down #degraded: …` or `up` from the state a process's unit writes for
that server's port.

The backend is test_gateway_boundary's recorder (it stands for llama-server and passes /health throughout), so
only the agent's answer can take the server out of the rotation.
"""

import hashlib
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from test_gateway_boundary import MODEL, Recorder, start_recorder

import builder.cluster.gateway as gateway_module
from builder.cluster.gateway import ServerState, read_stats, start_gateway, stop_gateway, write_gateway
from builder.cluster.model import load_cluster
from builder.netboot.plan import AGENT_PORT
from conftest import ROOT, free_port, require_tool


@dataclass(frozen=True)
class Node:
    url: str
    key: str
    metrics: int
    agent_port: int
    states: Path  # the agent's folder: one file per server port, as plan.sh writes them
    recorder: Recorder

    def say(self, answer: str) -> None:
        (self.states / str(self.recorder.port)).write_text(answer + "\n")

    def server(self) -> ServerState:
        return next(s for s in read_stats(self.metrics) if s.service == "chat")

    def wait_for(self, status: str) -> ServerState:
        deadline = time.monotonic() + 30
        while (state := self.server()).status != status or state.last_check != "L7OK":
            assert time.monotonic() < deadline, f"the server stayed {state}"
            time.sleep(0.2)
        return state


def ask(port: int, question: bytes) -> bytes:
    """What the agent answers to one question (as HAProxy asks: connect, send, read to the close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(question)
        out = b""
        while chunk := conn.recv(1024):
            out += chunk
    return out


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    require_tool("haproxy", "haproxy")
    require_tool("perl", "perl")
    folder = tmp_path_factory.mktemp("agent")
    (folder / "tiny.gguf").write_bytes(MODEL)
    states = folder / "agent"
    states.mkdir()
    recorder, server = start_recorder()
    agent_port, port, metrics = free_port(), free_port(), free_port()
    # the node's agent, as builder-agent.service starts it (on the node's address)
    agent = subprocess.Popen(["bash", "-c", '. "$1" && exec perl -e "$AGENT_SCRIPT" 127.0.0.1 "$2" "$3"', "agent",
                              str(ROOT / "images" / "netboot" / "plan.sh"), str(agent_port), str(states)])
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", agent_port), timeout=1).close()
            break
        except OSError:
            assert agent.poll() is None and time.monotonic() < deadline, "the agent does not listen"
            time.sleep(0.1)
    data = {"gateway": {"port": port, "metrics_port": metrics},
            "nodes": [{"name": "a", "mac": "52:54:00:12:34:01", "target": "cpu", "memory": "4GiB"}],
            "services": [{"name": "chat", "model": "tiny.gguf", "sha256": hashlib.sha256(MODEL).hexdigest(),
                          "nodes": ["a"], "port": recorder.port}]}
    (folder / "cluster.yaml").write_text(yaml.safe_dump(data))
    loaded = load_cluster(folder / "cluster.yaml")
    state = folder / "state"
    state.mkdir()
    pidfile = state / "haproxy.pid"
    saved = gateway_module.AGENT_PORT
    gateway_module.AGENT_PORT = agent_port  # the node's agent port, moved to a free one on this machine
    try:
        config = write_gateway(loaded, state, "127.0.0.1", {"a": "127.0.0.1"}, agents=frozenset(loaded.agent_nodes()))
        gateway_module.AGENT_PORT = saved
        start_gateway(config, pidfile)
        yield Node(f"http://127.0.0.1:{port}", (state / "api-key").read_text().strip(), metrics, agent_port, states,
                   recorder)
    finally:
        gateway_module.AGENT_PORT = saved
        stop_gateway(pidfile)
        agent.terminate()
        agent.wait(timeout=10)
        server.shutdown()


def test_the_config_asks_the_agent_of_a_netbooted_server(tmp_path: Path) -> None:
    require_tool("haproxy", "haproxy")
    (tmp_path / "tiny.gguf").write_bytes(MODEL)
    data = {"nodes": [{"name": n, "mac": f"52:54:00:12:34:0{i}", "target": "cpu", "memory": "4GiB"}
                      for i, n in enumerate("ab")],
            "services": [{"name": "chat", "model": "tiny.gguf", "sha256": hashlib.sha256(MODEL).hexdigest(),
                          "nodes": ["a", "b"], "port": 8189}]}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(data))
    loaded = load_cluster(tmp_path / "cluster.yaml")
    assert loaded.agent_nodes() == {"a", "b"}
    (tmp_path / "state").mkdir()
    config = write_gateway(loaded, tmp_path / "state", "127.0.0.1", {"a": "10.0.0.2", "b": "10.0.0.3"},
                           agents=frozenset({"a"})).read_text()
    servers = [line.strip() for line in config.splitlines() if line.strip().startswith("server ")]
    assert servers == [f'server a 10.0.0.2:8189 check agent-check agent-port {AGENT_PORT} agent-inter 2s '
                       'agent-send "8189\\n"', "server b 10.0.0.3:8189 check"]


def test_the_agent_answers_per_server_port(node: Node) -> None:
    node.say("down #degraded: no Vulkan device")
    assert ask(node.agent_port, f"{node.recorder.port}\n".encode()) == b"down #degraded: no Vulkan device\n"
    unknown = 1 if node.recorder.port != 1 else 2
    assert ask(node.agent_port, f"{unknown}\n".encode()) == f"down #no server on port {unknown}\n".encode()
    assert ask(node.agent_port, b"../etc/passwd\n") == b"down #the agent takes a port number and a newline\n"


def test_a_degraded_server_leaves_the_rotation_and_comes_back(node: Node) -> None:
    node.say("down #degraded: no Vulkan device: llama.cpp lists CPU")
    # its /health passes all along: only the agent takes it out
    down = node.wait_for("DOWN")
    assert down.last_check == "L7OK"
    # `cluster status` says why
    assert down.why == "degraded: no Vulkan device: llama.cpp lists CPU"
    assert down.fields()["why"] == down.why
    body = {"model": "chat", "prompt": "hi"}
    headers = {"Authorization": f"Bearer {node.key}"}
    node.recorder.clear()
    resp = requests.post(f"{node.url}/v1/completions", json=body, headers=headers, timeout=30)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "service_unavailable"
    assert node.recorder.paths() == []
    node.say("up")
    assert node.wait_for("UP").why == ""
    resp = requests.post(f"{node.url}/v1/completions", json=body, headers=headers, timeout=30)
    assert resp.status_code == 200 and node.recorder.paths() == [("POST", "/v1/completions")]
