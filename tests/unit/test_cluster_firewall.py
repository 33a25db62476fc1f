"""Compute nodes' nftables rules from the cluster file: `nft -c` accepts them, and loaded in a network namespace
of their own they refuse a connection from outside the cluster while the cluster's addresses connect."""

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.cluster.firewall import firewalls
from builder.netboot.firewall import ruleset
from builder.netboot.nodeunits import JOURNAL_PORT
from builder.netboot.plan import AGENT_PORT
from conftest import require_tool, run_cli_inproc

SHA = hashlib.sha256(b"x").hexdigest()
CONTROL, NODE_A, NODE_B, OUTSIDER = "10.0.0.1", "10.0.0.11", "10.0.0.12", "10.0.0.99"


def services_file(tmp_path: Path, **changes: Any) -> Path:
    data: dict[str, Any] = {
        "control": {"address": CONTROL},
        "nodes": [
            {"name": "a", "mac": "52:54:00:00:04:01", "target": "cpu", "memory": "8GiB", "address": NODE_A},
            {"name": "b", "mac": "52:54:00:00:04:02", "target": "cpu", "memory": "8GiB", "address": NODE_B},
            {"name": "c", "mac": "52:54:00:00:04:03", "target": "cpu", "memory": "8GiB", "address": "fd00::13"},
        ],
        "services": [
            {"name": "chat", "model": "http://10.0.0.1/m.gguf", "sha256": SHA, "memory": "1GiB", "nodes": ["a"],
             "port": 9000},
            {"name": "big", "model": "http://10.0.0.1/m.gguf", "sha256": SHA, "memory": "1GiB",
             "topology": "split", "head": "a", "workers": ["b", "c"]},
        ],
    }
    data.update(changes)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def nft_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nft", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)


def test_every_nodes_rules_pass_nft_check(tmp_path: Path) -> None:
    require_tool("nft", "nftables")
    out = tmp_path / "rules"
    proc = run_cli_inproc("cluster", "firewall", str(services_file(tmp_path)), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.nft", "b.nft", "c.nft"]
    for path in out.iterdir():
        check = nft_check(path)
        assert check.returncode == 0, (path.name, check.stderr)
    rules = (out / "a.nft").read_text()
    assert f"elements = {{ {CONTROL}, {NODE_A}, {NODE_B} }}" in rules and "elements = { fd00::13 }" in rules
    assert "backend ports (8193, 9000)" in rules  # big's port from its name, chat's its own


def test_the_netboot_form_gets_rules_too(tmp_path: Path) -> None:
    require_tool("nft", "nftables")
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"control": {"address": CONTROL}, "nodes": [
        {"name": "w", "mac": "52:54:00:00:04:11", "target": "cpu", "role": "rpc-worker", "address": NODE_B}]}))
    proc = run_cli_inproc("cluster", "firewall", str(path), "--node", "w")
    assert proc.returncode == 0, proc.stderr
    assert f"elements = {{ {CONTROL}, {NODE_B} }}" in proc.stdout and "backend ports (50052)" in proc.stdout
    (tmp_path / "w.nft").write_text(proc.stdout)
    assert nft_check(tmp_path / "w.nft").returncode == 0


CONNECT = textwrap.dedent("""
    import socket, sys
    node, port = sys.argv[1], int(sys.argv[2])
    listener = socket.create_server((node, port))
    for source in sys.argv[3:]:
        client = socket.socket()
        client.settimeout(5)
        client.bind((source, 0))
        try:
            client.connect((node, port))
            print(source, "connected")
        except OSError as exc:
            print(source, type(exc).__name__)
        client.close()
""")


def test_a_port_is_refused_from_outside_the_cluster(tmp_path: Path) -> None:
    """In a network namespace of its own (nothing outside it is touched): node a's rules loaded, a server on
    a's address; the cluster's addresses connect, an outsider is refused at once. Loading the rules twice
    replaces builder's table and leaves another table alone."""
    require_tool("nft", "nftables")
    require_tool("unshare", "util-linux")
    require_tool("ip", "iproute2")
    rules = tmp_path / "a.nft"
    rules.write_text(ruleset(next(f for f in firewalls(services_file(tmp_path)) if f.node == "a"), "cluster.yaml"))
    (tmp_path / "connect.py").write_text(CONNECT)
    (tmp_path / "other.nft").write_text("table inet someone_else {\n}\n")
    script = "; ".join([
        # the namespace's loopback holds every address: no interface module is needed
        "set -e", "ip link set lo up", *(f"ip addr add {a}/24 dev lo" for a in (CONTROL, NODE_A, NODE_B, OUTSIDER)),
        f"nft -f {tmp_path / 'other.nft'}", f"nft -f {rules}", f"nft -f {rules}", "nft list tables",
        f"{sys.executable} {tmp_path / 'connect.py'} {NODE_A} 9000 {NODE_B} {CONTROL} {NODE_A} {OUTSIDER} 127.0.0.1",
    ])
    proc = subprocess.run(["unshare", "--net", "--", "sh", "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "table inet someone_else" in lines and lines.count("table inet builder_cluster") == 1
    assert lines[-5:] == [f"{NODE_B} connected", f"{CONTROL} connected", f"{NODE_A} connected",
                          f"{OUTSIDER} ConnectionRefusedError", "127.0.0.1 connected"]


def test_the_agent_and_journal_ports_admit_the_control_node_only(tmp_path: Path) -> None:
    """Node a runs a llama-server, so its gateway agent: in a namespace of its own, with a's rules loaded, only
    the control node (and loopback) reach the agent port; another node of the cluster is refused like an
    outsider; the same for the journal's port (systemd-journal-gatewayd: `cluster logs`). Node b (an RPC worker
    only) runs no agent and has no agent rule, only the journal's."""
    require_tool("nft", "nftables")
    require_tool("unshare", "util-linux")
    require_tool("ip", "iproute2")
    rules = {f.node: ruleset(f, "cluster.yaml") for f in firewalls(services_file(tmp_path))}
    assert f"the control node's ports ({AGENT_PORT}, {JOURNAL_PORT}: gateway agent, journal) from the control " \
        "node only" in rules["a"]
    assert str(AGENT_PORT) not in rules["b"] and f"ports ({JOURNAL_PORT}: gateway agent, journal)" in rules["b"]
    (tmp_path / "a.nft").write_text(rules["a"])
    (tmp_path / "connect.py").write_text(CONNECT)
    script = "; ".join([
        "set -e", "ip link set lo up", *(f"ip addr add {a}/24 dev lo" for a in (CONTROL, NODE_A, NODE_B, OUTSIDER)),
        f"nft -f {tmp_path / 'a.nft'}",
        f"{sys.executable} {tmp_path / 'connect.py'} {NODE_A} {AGENT_PORT} {CONTROL} {NODE_B} {OUTSIDER} 127.0.0.1",
        f"{sys.executable} {tmp_path / 'connect.py'} {NODE_A} {JOURNAL_PORT} {CONTROL} {NODE_B} {OUTSIDER} 127.0.0.1",
    ])
    proc = subprocess.run(["unshare", "--net", "--", "sh", "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    once = [f"{CONTROL} connected", f"{NODE_B} ConnectionRefusedError", f"{OUTSIDER} ConnectionRefusedError",
            "127.0.0.1 connected"]
    assert proc.stdout.splitlines()[-8:] == once + once  # the agent's port, then the journal's


@pytest.mark.parametrize(("change", "message"), [
    ({"control": None}, "control: the firewall admits the control node, and none is declared"),
    ({"control": {"address": "gateway.lan"}}, "control.address: 'gateway.lan' is a name; builder binds and admits "
                                              "IP addresses"),
    ({"nodes": [{"name": "a", "mac": "52:54:00:00:04:01", "target": "cpu", "memory": "8GiB"}],
      "services": [{"name": "chat", "model": "http://10.0.0.1/m.gguf", "sha256": SHA, "memory": "1GiB",
                    "nodes": ["a"]}]},
     "nodes[0].address: the firewall admits addresses, and none is given"),
])
def test_a_node_without_an_address_is_one_line(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    path = services_file(tmp_path, **change)
    if change.get("control", 1) is None:
        data = yaml.safe_load(path.read_text())
        del data["control"]
        path.write_text(yaml.safe_dump(data))
    proc = run_cli_inproc("cluster", "firewall", str(path), "--out", str(tmp_path / "rules"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("error: ") and "cluster.yaml: " in first and message in first, proc.stderr


def test_firewall_wants_one_node_or_a_folder(tmp_path: Path) -> None:
    proc = run_cli_inproc("cluster", "firewall", str(services_file(tmp_path)))
    assert proc.returncode == 2 and "give --node NAME" in proc.stderr and "nodes: a, b, c" in proc.stderr
    proc = run_cli_inproc("cluster", "firewall", str(services_file(tmp_path)), "--node", "zz")
    assert proc.returncode == 2 and "no node named 'zz'" in proc.stderr
