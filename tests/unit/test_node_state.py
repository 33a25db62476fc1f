"""Each netbooted node's state in `builder cluster status`: what the node's agent answers to `state` (the real
agent from images/netboot/plan.sh, on loopback, reading state files as the node's scripts write them), how the
control node checks that answer (hostile ones included), and what status shows and counts as a problem. For the
command itself, two netbooted nodes a (127.0.0.1) and b (127.0.0.2) serve `chat` behind the real HAProxy
(backends.py's stand-ins for llama-server) from a real pxe-root with two generations; each node's agent is a
stand-in socket server in the test answering the node's wire format (a line of KEY=percent-encoded tokens)."""

import json
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from backends import LoopbackGateway, loopback_gateway
from test_netboot import fake_artifacts, publish

import builder.cluster.ssh as ssh_module
from builder.cluster.nodestate import BadState, boot_words, parse, read_state
from builder.netboot.publish import pin
from conftest import ROOT, free_port, require_tool, run_cli_inproc

STEMS = {"a": "52-54-00-12-34-00", "b": "52-54-00-12-34-01"}
PLAN_SH = ROOT / "images" / "netboot" / "plan.sh"
H1, H2, H3 = "1" * 64, "2" * 64, "3" * 64


def _ask(port: int, word: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"{word}\n".encode())
        out = b""
        while chunk := conn.recv(4096):
            out += chunk
    return out.decode("ascii")


def test_the_node_agent_answers_state_from_what_the_node_wrote(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The node's scripts keep each value in a file (node_state, say_error); the agent reads them, the kernel
    command line and the image id, and answers one ASCII line that the control node reads back as written."""
    require_tool("perl", "perl")
    state, agent_dir = tmp_path / "state", tmp_path / "agent"
    agent_dir.mkdir()
    cmdline, image = tmp_path / "cmdline", tmp_path / "image.digest"
    # a real node's command line is long (its root, firewall and plan URLs, its networks): the words come late
    cmdline.write_text(f"initrd=x builder.sha256={H1} builder.root=http://10.0.2.2:8000/{'x' * 2000} "
                       f"builder.name=n1 builder.plan_sha256={H2} builder.firewall_sha256={H3} "
                       f"builder.sha256={'4' * 64} quiet\n")
    image.write_text(f"sha256:{'5' * 64}\n")
    # what the node's scripts write (plan.sh's node_state and say_error), control characters and all
    script = ('. "$1"; say() { echo "builder-node: $*"; }; node_state device degraded; '
              'node_state devices CPU,Vulkan0; node_state device_why "no Vulkan0 device: llama.cpp lists CPU"; '
              'node_state qualify failed; say_error "$(printf "tiny server exited (exit-code: 1 \\001\\033[31m)")"')
    said = subprocess.run(["bash", "-c", script, "node", str(PLAN_SH)], env={"NODE_STATE_DIR": str(state),
                          "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30, check=True)
    assert said.stdout.startswith("builder-node: tiny server exited (exit-code: 1 "), said.stdout
    port = free_port()
    agent = subprocess.Popen(["bash", "-c", '. "$1" && exec perl -e "$AGENT_SCRIPT" 127.0.0.1 "$2" "$3" "$4" "$5" '
                              '"$6"', "agent", str(PLAN_SH), str(port), str(agent_dir), str(state), str(cmdline),
                              str(image)])
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                answer = _ask(port, "state")
                break
            except OSError:
                assert agent.poll() is None and time.monotonic() < deadline, "the agent does not listen"
                time.sleep(0.1)
        assert answer.endswith("\n") and answer.count("\n") == 1 and answer.isascii(), answer
        assert all(" " <= c <= "~" for c in answer[:-1]), answer
        monkeypatch.setattr(ssh_module, "AGENT_PORT", port)
        got = read_state("127.0.0.1")
        # the first builder.sha256 word counts (the node's scripts read it the same way)
        assert got.fields == {"root": H1, "plan": H2, "firewall": H3, "image": f"sha256:{'5' * 64}",
                              "device": "degraded", "devices": "CPU,Vulkan0",
                              "device_why": "no Vulkan0 device: llama.cpp lists CPU", "qualify": "failed",
                              "error": "tiny server exited (exit-code: 1 [31m)"}, answer
        for path in state.iterdir():
            path.unlink()
        cmdline.write_text("quiet\n")
        image.unlink()
        assert _ask(port, "state") == "none\n"  # nothing known: nothing invented
        assert read_state("127.0.0.1").fields == {}
    finally:
        agent.terminate()
        agent.wait(timeout=10)


@pytest.mark.parametrize(("answer", "why"), [
    ("x" * 5000, "5000 characters, above 4096"),
    ("", "token 1 is not KEY=VALUE"),
    (f"root={H1}  plan={H2}", "token 2 is not KEY=VALUE"),
    (f"root={H1} root={H2}", "root given twice"),
    ("root=" + "1" * 63, "root: not of the expected form"),
    ("root=" + "A" * 64, "root: not of the expected form"),
    ("image=" + "1" * 64, "image: not of the expected form"),
    ("device=gone", "device: not of the expected form"),
    ("qualify=qualified%0Adevice%3Dready", "qualify: not of the expected form"),
    ("devices=CPU%20Vulkan0", "devices: not of the expected form"),
    ("devices=" + ",".join(["CPU"] * 17), "devices: not of the expected form"),
    ("error=", "error: 0 bytes, expected 1 to 400"),
    ("error=" + "x" * 401, "error: 401 bytes, expected 1 to 400"),
    ("error=100%", "token 1 is not KEY=VALUE"),
    ("error=%zz", "token 1 is not KEY=VALUE"),
    ("error=a b", "token 2 is not KEY=VALUE"),
    ("ERROR=x", "token 1 is not KEY=VALUE"),
])
def test_a_hostile_state_answer_is_refused(answer: str, why: str) -> None:
    with pytest.raises(BadState) as caught:
        parse(answer)
    assert str(caught.value).startswith(why), caught.value


def test_free_text_is_shown_as_printable_ascii_and_unknown_keys_are_skipped() -> None:
    got = parse("error=a%1B%5B2J%C3%A9%7Fb%25 future_key=%00 qualify_device=Vulkan0")
    assert got == {"error": "a?[2J???b%", "qualify_device": "Vulkan0"}


class _Agent(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    answers: dict[str, str]


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(5)
        word = self.rfile.readline(64).decode("ascii", errors="replace").strip()
        answers = self.server.answers  # type: ignore[attr-defined]
        self.wfile.write(answers.get(word, "down #the agent takes a port number and a newline\n").encode())


@dataclass
class Nodes:
    gw: LoopbackGateway
    root: Path
    generations: dict[str, str]  # seed -> generation id
    agents: dict[str, _Agent]

    def boots(self, node: str, seed: str) -> str:
        """`root=… plan=… firewall=…` of `seed`'s boot files for `node`, as its agent reports them."""
        words = boot_words(self.root, self.generations[seed], STEMS[node])
        assert words is not None
        return " ".join(f"{key}={value}" for key, value in words.items())

    def answer(self, node: str, state: str) -> None:
        self.agents[node].answers = {"state": f"{state}\n", "units": "builder-process@chat-server.service="
                                     "active/running builder-qualify.service=active/exited\n"}

    def status(self, *args: str) -> "subprocess.CompletedProcess[str]":
        return run_cli_inproc("cluster", "status", "--root", str(self.root), *args, "--", str(self.gw.cluster))


@pytest.fixture
def nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Nodes]:
    require_tool("haproxy", "haproxy")
    port = free_port()
    monkeypatch.setattr(ssh_module, "AGENT_PORT", port)  # the nodes' agent port, moved to a free one
    with loopback_gateway(tmp_path, free_port, monkeypatch, netboot=True) as gw:
        root = tmp_path / "pxe-root"
        ids = {}
        for seed in ("old", "new"):  # `new` is the current generation
            folder, manifest = fake_artifacts(tmp_path, seed)
            ids[seed], _ = publish(root, gw.cluster, {("cpu", "cpu"): (folder, manifest)})
        agents = {}
        for name, address in (("a", "127.0.0.1"), ("b", "127.0.0.2")):
            agents[name] = _Agent((address, port), _Handler)
            agents[name].answers = {}
            threading.Thread(target=agents[name].serve_forever, daemon=True).start()
        try:
            yield Nodes(gw, root, ids, agents)
        finally:
            for agent in agents.values():
                agent.shutdown()
                agent.server_close()


GOOD = f"image=sha256:{'0' * 64} device=ready devices=CPU device_why=llama.cpp%20lists%20CPU%20%28x86%29 " \
       "qualify=qualified qualify_device=CPU qualify_why=CPU%20gives%20the%20ids%20recorded"


def test_status_shows_each_node_state_and_exits_0_when_all_is_right(nodes: Nodes) -> None:
    for node in ("a", "b"):
        nodes.answer(node, f"{nodes.boots(node, 'new')} {GOOD}")
    done = nodes.status("--json")
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(done.stdout)
    a = next(n for n in document["nodes"] if n["name"] == "a")
    assert a["state"]["generation"] == {"expected": nodes.generations["new"], "pinned": False,
                                        "running": nodes.generations["new"]}
    assert a["state"]["image"] == {"digest": f"sha256:{'0' * 64}", "name": "localhost/builder/cpu:cpu"}
    assert a["state"]["device"] == {"state": "ready", "devices": ["CPU"], "why": "llama.cpp lists CPU (x86)"}
    assert a["state"]["qualification"] == {"state": "qualified", "device": "CPU",
                                           "why": "CPU gives the ids recorded"}
    assert a["state"]["last_error"] is None and document["problems"] == []
    text = nodes.status()
    assert text.returncode == 0 and text.stdout.rstrip().endswith("state    serving"), text.stdout
    lines = text.stdout.splitlines()
    assert f"  a            generation {nodes.generations['new']} (current {nodes.generations['new']})" in lines
    assert "  a            device     ready (lists CPU): llama.cpp lists CPU (x86)" in lines
    assert "  b            qualify    qualified on CPU: CPU gives the ids recorded" in lines
    assert f"  b            image      sha256:{'0' * 64} (localhost/builder/cpu:cpu)" in lines


def test_status_names_what_the_user_must_act_on(nodes: Nodes) -> None:
    """A degraded device, a failed qualification and a node on another generation than the current one are
    problems (exit 1, one line each; a degraded device's failed qualification is the device's problem, said once);
    the last error is shown, not counted."""
    nodes.answer("a", f"{nodes.boots('a', 'new')} {GOOD.replace('qualify=qualified', 'qualify=unqualified')} "
                      "error=tiny%20server%20exited%20%28exit-code%3A%201%29")
    nodes.answer("b", f"{nodes.boots('b', 'old')} device=degraded devices=CPU "
                      "device_why=no%20Vulkan0%20device%3A%20llama.cpp%20lists%20CPU qualify=failed "
                      "qualify_why=no%20Vulkan0%20device")
    done = nodes.status("--json")
    document = json.loads(done.stdout)
    old, new = nodes.generations["old"], nodes.generations["new"]
    assert done.returncode == 1 and document["problems"] == [
        "a's qualification: unqualified (CPU gives the ids recorded)",
        "b's device is degraded (no Vulkan0 device: llama.cpp lists CPU)",
        f"b runs generation {old}, not {new} (the current one): reboot it"], done.stdout
    text = nodes.status()
    assert text.returncode == 1, text.stdout
    assert "  a            last error tiny server exited (exit-code: 1)" in text.stdout.splitlines()
    assert f"  b            generation {old} (current {new})" in text.stdout.splitlines()
    assert text.stdout.splitlines()[-1].startswith("state    NOT SERVING: a's qualification: unqualified"), \
        text.stdout


def test_a_pinned_node_and_an_allowed_fallback_are_no_problem(nodes: Nodes) -> None:
    """A node pinned to the old generation (`pxe pin`, a roll) should run it; a node whose env allows the
    fallback runs on what llama.cpp lists, and its qualification cannot pass there."""
    pin(nodes.root, STEMS["b"], nodes.generations["old"])
    nodes.answer("a", f"{nodes.boots('a', 'new')} device=fallback devices=CPU qualify=failed")
    nodes.answer("b", f"{nodes.boots('b', 'old')} {GOOD}")
    done = nodes.status()
    assert done.returncode == 0, done.stdout
    old = nodes.generations["old"]
    assert f"  b            generation {old} (pinned to {old})" in done.stdout.splitlines()
    nodes.answer("b", f"{nodes.boots('b', 'new')} {GOOD}")
    done = nodes.status("--json")
    assert json.loads(done.stdout)["problems"] == [
        f"b runs generation {nodes.generations['new']}, not {old} (its pin): reboot it"]


@pytest.mark.parametrize(("answer", "problem"), [
    (f"root={H1} plan={H2}", "b booted files of no generation in pxe-root, not {new} (the current one): reboot it"),
    ("device=ready\x1b[2J", "b: its agent's state answer is malformed (token 1 is not KEY=VALUE (percent-encoded))"),
    ("root=../../etc", "b: its agent's state answer is malformed (root: not of the expected form)"),
])
def test_a_node_on_unknown_files_or_with_a_malformed_answer_is_a_problem(nodes: Nodes, answer: str,
                                                                          problem: str) -> None:
    nodes.answer("a", f"{nodes.boots('a', 'new')} {GOOD}")
    nodes.answer("b", answer)
    done = nodes.status("--json")
    document = json.loads(done.stdout)
    assert done.returncode == 1 and document["problems"] == [problem.format(new=nodes.generations["new"])], \
        done.stdout


def test_an_agent_without_state_is_shown_not_counted(nodes: Nodes) -> None:
    """An agent of a netboot set made before `state` existed answers its usual refusal: status says how to get
    the state, and does not fail for it (a node that does not answer at all is its processes' health)."""
    nodes.answer("a", f"{nodes.boots('a', 'new')} {GOOD}")
    nodes.agents["b"].answers = {}
    done = nodes.status()
    assert done.returncode == 0, done.stdout
    assert "  b            state      not reported: its agent does not report state (a netboot set made before " \
           "builder added it: `builder pxe build`, then publish again)" in done.stdout.splitlines()


def test_a_missing_pxe_root_is_one_line(nodes: Nodes, tmp_path: Path) -> None:
    done = run_cli_inproc("cluster", "status", "--root", str(tmp_path / "nope"), "--", str(nodes.gw.cluster))
    assert done.returncode == 2 and done.stderr.strip().splitlines()[0] == \
        f"error: --root {tmp_path / 'nope'}: no such folder", done.stderr
