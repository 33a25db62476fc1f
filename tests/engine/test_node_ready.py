"""Ready means right on a netbooted node: a process's unit (images/netboot/node.sh) checks the device before it
announces a llama.cpp process, in the intel-arc/vulkan image on Mesa's software Vulkan device.

How the node runs: as tests/engine/test_engines_vllm_serve.py runs it (tests/support/nodeharness.py: the node's
scripts in the image, a stand-in for systemctl). `node plan` fetches a plan of one agent line, one rpc-worker
line and one server line (with the model) from `pxe serve`'s HTTP server on loopback, checks their sha256 and
starts their units. The image has no busybox: a bash stand-in gives the scripts the applets they call (wget as
an HTTP/1.0 GET over bash's /dev/tcp, loopback only).

ggml-vulkan ignores lavapipe (a CPU-type device) unless GGML_VK_VISIBLE_DEVICES=0, so by default the image
has no Vulkan device: the node says `degraded`, the RPC worker does not listen and the server's agent answers
`down` (the gateway keeps it out of the rotation; test_gateway_agent.py shows HAProxy acting on that answer).
With GGML_VK_VISIBLE_DEVICES=0 in the plan's env both are ready and the agent answers `up`; with
LLAMA_ALLOW_FALLBACK=1 instead they serve on the CPU and say so. The cpu image, whose device is the CPU, is
ready at once and qualifies once per node, before its server starts (the server's unit wants the
qualification's).
"""

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nodeharness import node_command, node_volumes

import builder.cluster.ssh as ssh_module
from builder.cluster.nodestate import node_document, problems, read_state
from builder.engines import ENGINES
from builder.netboot.plan import AgentLine, EnvLine, NodePlan, RpcWorkerLine, ServerLine, serialize
from builder.netboot.publish import add_blob, add_blob_bytes
from builder.netboot.serve import http_server
from conftest import free_port, require_engine, run_cli

pytestmark = pytest.mark.engine
ENGINE = "podman"
STARTUP_SECONDS = 300
BUSYBOX = r"""#!/bin/bash
case "$1" in
    wget)
        out=$4 url=${5#http://}
        where=${url%%/*}
        [[ $where == 127.0.0.1:* ]] || exit 1
        exec 3<>"/dev/tcp/127.0.0.1/${where#*:}" || exit 1
        printf 'GET /%s HTTP/1.0\r\nHost: %s\r\n\r\n' "${url#*/}" "$where" >&3
        read -r _ status _ <&3
        while IFS= read -r line <&3 && [ -n "${line%$'\r'}" ]; do :; done
        [ "$status" = 200 ] && cat <&3 >"$out" ;;
    grep) shift; exec grep "$@" ;;
    *) exit 1 ;;
esac
"""


@dataclass(frozen=True)
class Node:
    log: Path
    agent: int
    worker: int
    server: int

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, *lines: str) -> str:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not all(line in (text := self.text()) for line in lines):
            assert time.monotonic() < deadline, text[-4000:]
            time.sleep(0.5)
        return text

    def state(self, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
        """The node's state as `builder cluster status` reads it from the agent, and what it counts as problems."""
        monkeypatch.setattr(ssh_module, "AGENT_PORT", self.agent)
        entry = node_document(read_state("127.0.0.1"), None, "")
        return {**entry, "problems": problems("ci", entry)}

    def ask_agent(self) -> bytes:
        """The agent's answer for the server, as the gateway's agent-check asks it."""
        with socket.create_connection(("127.0.0.1", self.agent), timeout=10) as conn:
            conn.sendall(f"{self.server}\n".encode())
            out = b""
            while chunk := conn.recv(1024):
                out += chunk
        return out


def listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def arc_vulkan() -> str:
    require_engine(ENGINE)
    proc = run_cli("build", "--target", "intel-arc", "--variant", "vulkan", "--engine", ENGINE, "--json",
                   timeout=3600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    image: str = json.loads(proc.stdout)["image"]
    return image


@pytest.fixture(scope="module")
def cpu() -> str:
    require_engine(ENGINE)
    proc = run_cli("build", "--target", "cpu", "--engine", ENGINE, "--json", timeout=3600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    image: str = json.loads(proc.stdout)["image"]
    return image


@contextmanager
def node(image: str, model: Path, work: Path, env: dict[str, str]) -> Iterator[Node]:
    """The node's units in the image (nodeharness.py), from a plan with the node's `env`, an RPC worker of `big`
    and a server of `chat`."""
    agent, worker, server, http = free_port(), free_port(), free_port(), free_port()
    root = work / "pxe-root"
    (root / "current").mkdir(parents=True)
    sha = add_blob(root, model)
    base = f"http://127.0.0.1:{http}"
    lines = [*(EnvLine(k, v) for k, v in env.items()), AgentLine(agent), RpcWorkerLine("big", worker),
             ServerLine("chat", server, f"{base}/blobs/sha256/{sha}", sha, (), 256, ("-t", "2"))]
    plan = add_blob_bytes(root, serialize(NodePlan("ci", tuple(lines))).encode())
    files = http_server(root, "127.0.0.1", http)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    name = f"node-ready-{server}"
    engine = ENGINES[ENGINE]()
    log = work / "node.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([
            *engine.run_argv(), "--rm", "--network", "host", "--name", name, *node_volumes(work, BUSYBOX), image,
            "shell", "-c", node_command(f"{base}/blobs/sha256/{plan}", plan)], stdout=out, stderr=subprocess.STDOUT)
    try:
        yield Node(log, agent, worker, server)
    finally:
        subprocess.run([*engine.command(), "rm", "--force", name], capture_output=True)
        proc.wait(timeout=60)
        files.shutdown()
        files.server_close()


def test_without_its_device_the_worker_does_not_listen_and_the_server_is_out_of_rotation(
        arc_vulkan: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with node(arc_vulkan, tiny_model, tmp_path, {}) as ci:
        text = ci.wait_for("builder-node: ci rpc-worker big degraded: no Vulkan device: llama.cpp lists CPU (",
                           f"builder-node: ci server chat answers on 127.0.0.1:{ci.server} (degraded: out of the "
                           "gateway's rotation)")
        assert "builder-node: ci server chat degraded: no Vulkan device: llama.cpp lists CPU (" in text
        assert f"gateway agent on 127.0.0.1:{ci.agent}" in text
        # the server answers its /health, but its agent takes it out of the gateway's rotation
        assert ci.ask_agent().startswith(b"down #degraded: no Vulkan device: llama.cpp lists CPU (")
        # the worker is held, not started: its head cannot use it
        assert not listens(ci.worker)
        assert "ready on" not in ci.text() and "ggml-rpc-server on" not in ci.text()
        # said once, not once per restart
        assert ci.text().count("ci rpc-worker big degraded:") == 1
        # `cluster status` reads the degraded device from the node's agent, and counts it as a problem
        got = ci.state(monkeypatch)
        state: Any = got["state"]
        assert state["device"]["state"] == "degraded" and state["device"]["devices"] == ["CPU"], got
        assert str(state["device"]["why"]).startswith("no Vulkan device: llama.cpp lists CPU ("), got
        assert str(state["last_error"]).startswith("ci "), got
        assert " degraded: no Vulkan device: llama.cpp lists CPU (" in str(state["last_error"]), got
        assert got["problems"] == [f"ci's device is degraded ({state['device']['why']})"], got


def test_with_lavapipe_visible_both_are_ready_and_the_agent_says_up(arc_vulkan: str, tiny_model: Path,
                                                                      tmp_path: Path) -> None:
    with node(arc_vulkan, tiny_model, tmp_path, {"GGML_VK_VISIBLE_DEVICES": "0"}) as ci:
        text = ci.wait_for(f"builder-node: ci rpc-worker ready on 127.0.0.1:{ci.worker} (for big)\n",
                           f"builder-node: ci server chat ready on 127.0.0.1:{ci.server}\n")
        assert "degraded" not in text
        assert ci.ask_agent() == b"up\n"
        assert listens(ci.worker)


def test_the_allowed_fallback_serves_on_the_cpu_and_says_why(arc_vulkan: str, tiny_model: Path,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with node(arc_vulkan, tiny_model, tmp_path, {"LLAMA_ALLOW_FALLBACK": "1"}) as ci:
        text = ci.wait_for(f"builder-node: ci rpc-worker ready on 127.0.0.1:{ci.worker} (for big) (fallback: "
                           "no Vulkan device: llama.cpp lists CPU (",
                           f"builder-node: ci server chat ready on 127.0.0.1:{ci.server} (fallback: no Vulkan device")
        assert ci.ask_agent() == b"up\n"
        assert listens(ci.worker)
        # the qualification runs once, before the server: on the CPU it reports the missing device
        text = ci.wait_for("builder-node: ci not qualified: no Vulkan device")
        assert text.count("qualified") == 1
        # `cluster status`: the fallback the node's env allows, and a qualification that cannot pass there, are
        # shown and not counted
        got = ci.state(monkeypatch)
        state: Any = got["state"]
        assert state["device"]["state"] == "fallback", got
        assert state["qualification"]["state"] == "failed", got
        assert str(state["qualification"]["why"]).startswith("no Vulkan device"), got
        assert got["problems"] == [], got


def test_the_cpu_image_qualifies_once_after_it_is_ready(cpu: str, tiny_model: Path, tmp_path: Path) -> None:
    """The cpu image's device is the CPU: ready at once, and one qualification for the node (not one per
    process), which gives the ids its build recorded."""
    with node(cpu, tiny_model, tmp_path, {}) as ci:
        ci.wait_for(f"builder-node: ci server chat ready on 127.0.0.1:{ci.server}\n")
        assert ci.ask_agent() == b"up\n"
        text = ci.wait_for("builder-node: ci qualified on CPU: CPU gives the ids recorded on CPU\n")
        assert text.count("qualified") == 1 and "degraded" not in text
