"""`builder cluster wake`: the magic packet a node's network card waits for, sent on the boot interface only.

The control node and the node are two network namespaces of the test's own joined by a veth pair: the packet is
captured on the node's side, so nothing is sent on a real interface.
"""

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, run_cli_inproc

MAC = "52:54:00:ab:cd:01"
OTHER = "52:54:00:ab:cd:02"
SHA = "0" * 64
# Reads one frame of EtherType 0x0842 (Wake-on-LAN) on the interface and prints its payload in hex.
LISTENER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0842))
    s.bind((sys.argv[1], 0))
    s.settimeout(20)
    print("listening", flush=True)
    frame = s.recv(2048)
    print(frame[:6].hex(), frame[12:14].hex(), frame[14:14 + 102].hex(), flush=True)
""")


def cluster_file(tmp_path: Path, interface: str | None) -> Path:
    control: dict[str, object] = {"address": "10.77.0.1"}
    if interface:
        control["interface"] = interface
    doc = {"control": control,
           "nodes": [{"name": "node1", "mac": MAC, "target": "cpu", "address": "10.77.0.11", "memory": "1GiB"},
                     {"name": "node2", "mac": OTHER, "target": "cpu", "address": "10.77.0.12", "memory": "1GiB"}],
           "services": [{"name": "tiny", "model": "http://10.77.0.1/tiny.gguf", "sha256": SHA, "memory": "100MiB",
                         "nodes": ["node1", "node2"]}]}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """Two namespaces, control and node, joined by a veth pair (wake-c in control, wake-n in node)."""
    if os.geteuid() != 0:
        pytest.fail("the Wake-on-LAN test needs root (network namespaces and a raw socket); CI runs as root")
    tag = f"{os.getpid()}"
    control, node = f"builder-wake-c-{tag}", f"builder-wake-n-{tag}"
    for name in (control, node):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", control, "link", "add", "wake-c", "type", "veth", "peer", "name", "wake-n",
                        "netns", node], check=True)
        subprocess.run(["ip", "-n", control, "link", "set", "wake-c", "up"], check=True)
        subprocess.run(["ip", "-n", node, "link", "set", "wake-n", "up"], check=True)
        yield control, node
    finally:
        for name in (control, node):
            subprocess.run(["ip", "netns", "delete", name], check=False)


def test_wake_sends_the_magic_packet_for_the_node_on_the_boot_interface(
        tmp_path: Path, namespaces: tuple[str, str]) -> None:
    control, node = namespaces
    path = cluster_file(tmp_path, "wake-c")
    listener = subprocess.Popen(["ip", "netns", "exec", node, sys.executable, "-c", LISTENER, "wake-n"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
        woke = subprocess.run(["ip", "netns", "exec", control, sys.executable, "-m", "builder", "cluster", "wake",
                               str(path), "node1"], capture_output=True, text=True, timeout=60)
        assert woke.returncode == 0, woke.stderr
        assert woke.stdout.strip() == f"woke node1 ({MAC}) on wake-c"
        out, err = listener.communicate(timeout=30)
    finally:
        listener.kill()
    assert listener.returncode == 0, err
    destination, ethertype, payload = out.split()
    assert ethertype == "0842"
    # six 0xff, then the node's MAC sixteen times: what the node's card matches (not node2's)
    assert payload == "ff" * 6 + MAC.replace(":", "") * 16
    assert destination in (MAC.replace(":", ""), "ff" * 6)


def test_wake_names_its_mistakes_in_one_line(tmp_path: Path) -> None:
    path = cluster_file(tmp_path, "wake-c")
    cases = [
        (["cluster", "wake", str(path), "nodee1"], "no node named 'nodee1' (did you mean 'node1'?)"),
        (["cluster", "wake", str(path)], "name the nodes to wake, or give --all"),
        (["cluster", "wake", str(path), "node1", "--all"], "name the nodes to wake, or give --all"),
        (["cluster", "wake", str(cluster_file(tmp_path, None)), "node1"],
         "control.interface: waking a node sends its magic packet on the boot network's interface"),
    ]
    for argv, said in cases:
        proc = run_cli_inproc(*argv)
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        assert said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_wake_on_an_interface_that_is_not_there_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("cluster", "wake", str(cluster_file(tmp_path, "nosuch0")), "--all", "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "etherwake could not send node1's packet on nosuch0" in proc.stderr, proc.stderr
