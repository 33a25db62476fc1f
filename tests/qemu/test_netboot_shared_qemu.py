"""One services-form cluster netbooted once, for the tests that only look at it (issue 17).

A QEMU node (TCG, one vCPU, user-mode networking) boots from `builder pxe publish`'s generation and runs four
processes from its plan: replicas of `tiny` and `tiny-b` (two llama-servers of one GGUF), the head of the split
`tiny-split` (its RPC worker a container on the host, which the guest reaches as 10.0.2.2) and the RPC worker of
the split `tiny-rpc` (its head a container on the host). node1 has a second NIC, its data network (issue 21): a
tap link with MTU 9000 to the module's namespace, where its RPC worker listens and the tiny-rpc head reaches it.
The checks then run in order: what the boot printed, the firewall (before any head holds the node's RPC worker:
ggml-rpc-server serves one client at a time), the gateway (`builder cluster up` without --local) in front of all
four services, each service through it, and `cluster down` last. A failing check gets the node's console tail in
its report (console_tail.py).

Everything that talks to the node runs in a network namespace of the module's own (netns.py): `pxe serve`,
QEMU, the containers, the gateway, `cluster status` and the tests' own requests. Its loopback holds 127.0.0.1,
MEMBER and OUTSIDER; its tap TAP (MTU 9000), QEMU's second NIC, holds HOST_DATA (host1's data address) and
DATA_OUTSIDER. QEMU shows the guest a connection from a loopback address as coming from 10.0.2.2; on the tap,
the guest sees each source as it is, so the firewall test knocks on the node's RPC port from a member of the
cluster and from an address of no cluster, in one boot.

The cluster file's addresses, as each side uses them: control 10.0.2.2 (the host as the guest sees it: `pxe
serve`'s files); node1 127.0.0.1 (where the gateway and `cluster status` reach its servers: QEMU's hostfwd of
each of its ports, same number; it binds its leased 10.0.2.15 whatever the file says), NODE_DATA on the data
network (its RPC worker); worker1 10.0.2.2 (the tiny-split worker container, as the node's head reaches it);
host1 MEMBER (the tiny-rpc head container, listening there; HOST_DATA on the data network, from where it reaches
node1's RPC worker). Ports are fixed: nothing else listens in the namespace.
"""

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from netns import Namespace, network_namespace
from test_netboot_qemu import BOOT_SECONDS, MAC, artifacts, published

from builder.cluster import runtime
from builder.cluster.model import load_cluster
from builder.cluster.remote import Remote
from builder.cluster.ssh import fingerprint, host_key
from builder.netboot import publish
from conftest import ROOT, require_tool, run_cli
from containers import PROMPT, container, cpu_reference_text
from qemu import node, wait_for

pytestmark = pytest.mark.engine
pytest_plugins = ["console_tail"]
__all__ = ["artifacts"]  # the fixture of test_netboot_qemu, which this module's fixture uses

MEMBER = "192.0.2.2"  # TEST-NET-1 on the namespace's loopback: the node host1 of the cluster file
OUTSIDER = "192.0.2.1"  # TEST-NET-1 on the namespace's loopback, in no cluster file
ADMIN = "192.0.2.3"  # TEST-NET-1 on the namespace's loopback: the operators' address (admins:), no node's
SSH, NODE_METRICS, AGENT = 22, 9100, 7999  # node1's ssh server and exporter (admins:), its gateway agent
JOURNAL = 19531  # node1's systemd-journal-gatewayd (the control node only)
HTTP, GATEWAY, METRICS = 8000, 8080, 8405
TINY, TINY_B, SPLIT, RPC_HEAD = 8101, 8102, 8103, 8104  # the four services' server ports
NODE_RPC, HOST_RPC = 50052, 50053  # node1's RPC worker (tiny-rpc), the host's container (tiny-split)
# The data network: a tap in the namespace (QEMU's second NIC), node1's data interface at NODE_DATA.
TAP, DATA_MAC, DATA_MTU = "bdata0", "52:54:00:12:34:66", 9000
BOOT_MTU = 1400  # the boot interface's, below QEMU user networking's 1500
NODE_DATA, HOST_DATA, DATA_OUTSIDER = "10.77.0.2", "10.77.0.1", "10.77.0.9"
# What node1 prints once each process answers, and the address it answers on (its worker on the data network).
READY = {"rpc-worker tiny-rpc": f"{NODE_DATA}:{NODE_RPC}", "server tiny": f"10.0.2.15:{TINY}",
         "server tiny-b": f"10.0.2.15:{TINY_B}", "server tiny-split": f"10.0.2.15:{SPLIT}"}
# the node's boot address, each port forwarded from 127.0.0.1 (its RPC port too: nothing may answer there),
# its ssh and exporter ports from the admins' address and an outsider's too, its journal from an outsider's too
FORWARDS = tuple(f"tcp:{address}:{port}-:{port}" for address, port in
                 [("127.0.0.1", p) for p in (TINY, TINY_B, SPLIT, NODE_RPC, AGENT, SSH, JOURNAL)] +
                 [(host, port) for host in (ADMIN, OUTSIDER) for port in (SSH, NODE_METRICS)] +
                 [(OUTSIDER, JOURNAL)])
PLAN_READY_SECONDS = 180  # after the first ready line, each further one (a model load under TCG)


@dataclass(frozen=True)
class Cluster:
    """The booted cluster the tests look at."""

    ns: Namespace
    folder: Path  # logs, the cluster file, the pxe-root
    path: Path  # cluster.yaml
    root: Path  # the pxe-root `pxe serve` serves
    console: Path  # node1's console
    digest: str  # the model's sha256
    expected: str  # the cpu image's own greedy text for PROMPT
    worker_log: Path  # the tiny-split worker container's output
    ready: dict[str, str]  # READY's label -> the address node1 said it listens on
    ready_s: float  # QEMU's start to the last ready line
    admin_key: Path  # the private key of admins: (its .pub beside it)
    vm: subprocess.Popen[bytes]  # node1's QEMU (started with -no-reboot: a reboot ends it)

    def text(self) -> str:
        return self.console.read_text(errors="replace")

    def words(self) -> list[str]:
        """node1's kernel command line words, from its iPXE script."""
        return (self.root / "current" / "nodes" / "52-54-00-12-34-56.ipxe").read_text().split()

    def blob(self, word: str) -> str:
        """The blob a `builder.WORD=SHA256` kernel word names, as text."""
        digest = next(w for w in self.words() if w.startswith(f"builder.{word}=")).split("=", 1)[1]
        return (self.root / "blobs" / "sha256" / digest).read_text()


def completion(ns: Namespace, url: str, model: str | None = None, key: str | None = None) -> requests.Response:
    """PROMPT's completion from `url` (…/v1/completions), asked from inside the namespace."""
    body: dict[str, Any] = {**PROMPT, **({"model": model} if model else {})}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with ns.inside():
        return requests.post(url, json=body, headers=headers, timeout=300)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
            artifacts: dict[str, object]) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("shared-cluster")
    expected = cpu_reference_text("podman", folder, tiny_model)
    model = folder / "tiny.gguf"
    shutil.copyfile(tiny_model, model)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    nodes: list[dict[str, object]] = [
        {"name": "node1", "mac": MAC, "target": "cpu", "memory": "512MiB", "address": "127.0.0.1", "mtu": BOOT_MTU,
         "data_interface": {"mac": DATA_MAC, "address": f"{NODE_DATA}/24", "mtu": DATA_MTU}},
        # these two stand for nodes that are containers on the host: nobody boots them
        {"name": "worker1", "mac": "52:54:00:12:34:57", "target": "cpu", "memory": "512MiB", "address": "10.0.2.2"},
        {"name": "host1", "mac": "52:54:00:12:34:58", "target": "cpu", "memory": "512MiB", "address": MEMBER,
         "data_interface": {"name": TAP, "address": f"{HOST_DATA}/24", "mtu": DATA_MTU}}]
    common = {"model": "tiny.gguf", "sha256": digest, "context": 256}
    services: list[dict[str, object]] = [
        {"name": "tiny", **common, "nodes": ["node1"], "port": TINY, "memory": "256MiB"},
        {"name": "tiny-b", **common, "nodes": ["node1"], "port": TINY_B},
        {"name": "tiny-split", **common, "topology": "split", "head": "node1", "workers": ["worker1"],
         "port": SPLIT, "rpc_port": HOST_RPC},
        {"name": "tiny-rpc", **common, "topology": "split", "head": "host1", "workers": ["node1"],
         "port": RPC_HEAD, "rpc_port": NODE_RPC}]
    require_tool("ssh", "openssh-client")
    admin_key = folder / "admin_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "admin@test", "-f", str(admin_key)],
                   check=True, timeout=60)
    admins = {"keys": [admin_key.with_suffix(".pub").read_text().strip()], "addresses": [ADMIN]}
    console = folder / "console.log"
    worker = f"builder-shared-split-worker-{os.getpid()}"
    require_tool("ip", "iproute2")
    with network_namespace(MEMBER, OUTSIDER, ADMIN) as ns, data_link(ns), \
            published(folder, HTTP, nodes, prefix=ns.enter, services=services,
                      gateway={"address": "127.0.0.1", "port": GATEWAY, "metrics_port": METRICS},
                      admins=admins) as root, \
            container("podman", folder, worker, "rpc-worker", "--host", "127.0.0.1", "--port", str(HOST_RPC),
                      prefix=ns.enter):
        started = time.monotonic()
        with node(root / "tftp", MAC, console, hostfwd=FORWARDS, prefix=ns.enter, cpus=1,
                  tap=(TAP, DATA_MAC)) as vm:
            ready: dict[str, str] = {}
            for nth, label in enumerate(READY):
                role, service = label.split()
                # a server names its service before `ready`, an RPC worker after it: "(for SERVICE)"
                pattern = (rf"builder-node: node1 rpc-worker ready on (\S+) \(for {service}\)" if role == "rpc-worker"
                           else rf"builder-node: node1 {label} ready on (\S+)")
                found = wait_for(console, pattern, vm, BOOT_SECONDS if nth == 0 else PLAN_READY_SECONDS)
                ready[label] = found.group(1)
            ready_s = time.monotonic() - started
            print(f"node1 booted to its last ready line in {ready_s:.0f} s")
            wait_for(console, r"builder-node: ssh server ready on ", vm, PLAN_READY_SECONDS)
            wait_for(console, r"builder-node: metrics ready on ", vm, PLAN_READY_SECONDS)
            yield Cluster(ns, folder, folder / "cluster.yaml", root, console, digest, expected,
                          folder / f"{worker}.log", ready, ready_s, admin_key, vm)


@contextmanager
def data_link(ns: Namespace) -> Iterator[None]:
    """The tap TAP in the namespace, up with MTU 9000, holding HOST_DATA and DATA_OUTSIDER: QEMU opens it as the
    node's second NIC (it goes with the namespace)."""
    for command in (["ip", "tuntap", "add", "dev", TAP, "mode", "tap"],
                    ["ip", "link", "set", TAP, "mtu", str(DATA_MTU), "up"],
                    ["ip", "addr", "add", f"{HOST_DATA}/24", "dev", TAP],
                    ["ip", "addr", "add", f"{DATA_OUTSIDER}/24", "dev", TAP]):
        subprocess.run([*ns.enter, *command], check=True, timeout=30)
    yield


def tap_bytes(ns: Namespace) -> tuple[int, int, int]:
    """(MTU, bytes sent to the node, bytes from it), from the host side of the tap."""
    shown = subprocess.run([*ns.enter, "ip", "-s", "-j", "link", "show", TAP], capture_output=True, text=True,
                           check=True, timeout=30)
    link = json.loads(shown.stdout)[0]
    return link["mtu"], link["stats64"]["tx"]["bytes"], link["stats64"]["rx"]["bytes"]


@pytest.fixture(scope="module")
def head(cluster: Cluster) -> Iterator[Path]:
    """tiny-rpc's head: a container on the host (node host1, at MEMBER) with every layer on node1's RPC worker,
    reached on the data network (the tap). Yields its log."""
    name = f"builder-shared-head-{os.getpid()}"
    log = cluster.folder / f"{name}.log"
    with container("podman", cluster.folder, name, "server", "-m", str(cluster.folder / "tiny.gguf"), "-c", "256",
                   "-t", "2", "--host", MEMBER, "--port", str(RPC_HEAD), "--rpc", f"{NODE_DATA}:{NODE_RPC}",
                   "-ngl", "99", "-lv", "4", prefix=cluster.ns.enter) as proc:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the head exited ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
            try:
                with cluster.ns.inside():
                    if requests.get(f"http://{MEMBER}:{RPC_HEAD}/health", timeout=5).status_code == 200:
                        break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the head is not healthy after 300 s:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(1)
        yield log


@dataclass(frozen=True)
class Gateway:
    lines: dict[str, str]  # what `cluster up` printed: first word -> the rest
    key: str


def cli(cluster: Cluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`builder ARGS` inside the namespace."""
    with cluster.ns.inside():
        return run_cli(*args, timeout=timeout)


@pytest.fixture(scope="module")
def gateway(cluster: Cluster, head: Path) -> Iterator[Gateway]:
    """`builder cluster up` (without --local) in front of the four services; `down` when the module ends (the
    last test runs it first and checks it)."""
    up = cli(cluster, "cluster", "up", str(cluster.path), "--timeout", "120", timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        lines = dict(line.split(None, 1) for line in up.stdout.splitlines() if line.strip())
        yield Gateway(lines, Path(lines["key"].split()[0]).read_text().strip())
    finally:
        cli(cluster, "cluster", "down", str(cluster.path))


def test_node_boots_from_its_plan_and_runs_every_process(cluster: Cluster, artifacts: dict[str, object]) -> None:
    """The node's script names a plan, not a role; the plan lists its RPC worker first, then its servers, the
    split's head with `--rpc` to its worker at 10.0.2.2; every server listens on the node's own leased address,
    never a wildcard, its RPC worker on its data address; both interfaces have their MTU; the boot lease is kept
    renewed; the model is fetched once for three servers and checked; the root is verified and opened through
    dm-verity in RAM mode (no cache disk)."""
    words = cluster.words()
    assert not any(w.startswith("builder.role=") for w in words) and any(w.startswith("builder.plan=") for w in words)
    lines = [line.split("\t") for line in cluster.blob("plan_sha256").splitlines() if not line.startswith("#")]
    assert lines[0] == ["agent", "7999"]  # the gateway's agent-check asks the node whether its servers are right
    blob = cluster.admin_key.with_suffix(".pub").read_text().split()[1]
    # admins:, public keys only
    assert lines[1:4] == [["admin-key", "ssh-ed25519", blob], ["ssh", str(SSH)], ["metrics", str(NODE_METRICS)]]
    assert lines[4] == ["memory", "tiny", str(256 << 20)]  # tiny's memory: its unit's MemoryMax=
    plan = lines[5:]
    assert [fields[:3] for fields in plan] == [["rpc-worker", "tiny-rpc", str(NODE_RPC)], ["server", "tiny", str(TINY)],
                                               ["server", "tiny-b", str(TINY_B)], ["server", "tiny-split", str(SPLIT)]]
    assert [fields[5] for fields in plan[1:]] == ["-", "-", f"10.0.2.2:{HOST_RPC}"]  # the split head's --rpc
    assert cluster.ready == READY
    assert f"builder.data_mac={DATA_MAC}" in words and f"builder.data_address={NODE_DATA}/24" in words
    text = cluster.text()
    assert re.search(rf"builder-initrd: data network: \S+ {NODE_DATA}/24 mtu {DATA_MTU}\n", text), text[-3000:]
    assert f"builder-initrd: network: eth0 10.0.2.15/24 mtu {BOOT_MTU}\n" in text and f"builder.mtu={BOOT_MTU}" in words
    # builder-dhcp.service keeps udhcpc running, renewing the lease; its first answer keeps the address the node holds
    renewing = text.index("builder-node: DHCP: the lease of 10.0.2.15 on ")
    assert re.search(r"udhcpc: lease of 10\.0\.2\.15 obtained", text[renewing:]), text[renewing:renewing + 2000]
    assert "lease changed" not in text
    assert "builder-node: node plan verified: sha256 " in text
    assert text.count(f"builder-node: model verified: sha256 {cluster.digest}") == 1  # one download for all three
    assert "download of" not in text and "mismatch" not in text  # the root and the model came on the first try
    squash: str = artifacts["files"]["root.squashfs"]["sha256"]  # type: ignore[index]
    assert f"root image verified: sha256 {squash}" in text
    assert "root opened through dm-verity: root hash" in text and "builder-initrd: cache" not in text
    memory = re.findall(r"builder-node: memory: MemAvailable (\d+) kB of MemTotal (\d+) kB", text)
    print(f"node1: ready after {cluster.ready_s:.0f} s; MemAvailable {int(memory[-1][0]) // 1024} MiB "
          f"of {int(memory[-1][1]) // 1024} MiB")


# ggml RPC: | command (1 byte) | size (8 bytes) | data |, answered by | size (8 bytes) | data |. HELLO is command
# 14 in every version; this protocol (v7) sends 24 bytes of transport capabilities and gets the version back.
def rpc_hello(host: str, port: int, source: str | None = None) -> str:
    """`version X.Y.Z` when the RPC server answers HELLO (asked from `source`, if given), `closed` when the
    connection ends without an answer, else the error's name."""
    try:
        with socket.create_connection((host, port), timeout=60,
                                      source_address=(source, 0) if source else None) as s:
            s.sendall(bytes([14]) + struct.pack("<Q", 24) + bytes(24))
            data = b""
            while len(data) < 11:
                more = s.recv(64)
                if not more:
                    break
                data += more
            return "version " + ".".join(str(b) for b in data[8:11]) if len(data) >= 11 else "closed"
    except OSError as exc:
        return type(exc).__name__


def test_firewall_admits_the_cluster_and_refuses_others(cluster: Cluster) -> None:
    """The node's rules (from the cluster file: the control node and every node's address, the data addresses
    among them) are fetched, checked and loaded before the root, so before any process listens; they match
    sources, not interfaces, so they cover the data interface too. Its RPC worker listens on the data network
    only: from HOST_DATA (host1's data address) it answers ggml RPC's HELLO, from DATA_OUTSIDER (on the same tap,
    in no cluster file) the connection is refused at once, and on the boot address (QEMU's forward from the control
    node) nothing answers. HOST_DATA and DATA_OUTSIDER differ only in the rules, so the refusal is the firewall's.
    Runs before the tiny-rpc head holds the worker."""
    rules = cluster.blob("firewall_sha256")
    assert f"elements = {{ 10.0.2.2, {HOST_DATA}, {NODE_DATA}, 127.0.0.1, 192.0.2.2 }}" in rules, rules
    assert OUTSIDER not in rules and DATA_OUTSIDER not in rules
    digest = next(w for w in cluster.words() if w.startswith("builder.firewall_sha256=")).split("=", 1)[1]
    text = cluster.text()
    loaded = text.index(f"builder-initrd: firewall loaded: sha256 {digest}")
    assert loaded < text.index("builder-initrd: data network:") < text.index("root image verified")
    answers = {}
    with cluster.ns.inside():
        for source in (HOST_DATA, DATA_OUTSIDER):
            answers[source] = rpc_hello(NODE_DATA, NODE_RPC, source)
        answers["boot address"] = rpc_hello("127.0.0.1", NODE_RPC)
    assert answers[HOST_DATA].startswith("version 7."), answers
    assert answers[DATA_OUTSIDER] in ("closed", "ConnectionResetError", "ConnectionRefusedError"), answers
    assert answers["boot address"] in ("closed", "ConnectionResetError"), answers


def host_fingerprint(cluster: Cluster, console: Path | None = None) -> str:
    """The fingerprint node1 printed on its console (its first boot's, or `console`) for the host key it made."""
    text = (console or cluster.console).read_text(errors="replace")
    found = re.search(r"builder-node: ssh host key (SHA256:\S+) \(ED25519\)", text)
    assert found, text[-3000:]
    return found.group(1)


def ssh(cluster: Cluster, host: str, key: Path, known_hosts: Path,
        command: str = "cat /proc/sys/kernel/hostname") -> subprocess.CompletedProcess[str]:
    """`command` run on node1 over ssh from `host` (QEMU's forward there shows the guest that address), as root
    with `key` only, the host key checked against `known_hosts`."""
    with cluster.ns.inside():
        return subprocess.run(["ssh", "-F", "none", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i", str(key),
                               "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
                               "-o", "ConnectTimeout=60", "-p", str(SSH), "-l", "root", "--", host,
                               command], capture_output=True, text=True, timeout=180)


def test_operators_get_in_by_key_from_admins_only(cluster: Cluster) -> None:
    """admins: gives node1 an ssh server (Debian's openssh-server of the root's suite, unpacked at pxe build):
    from ADMIN with the file's key, root runs a command there, the host key being the one the node made and
    printed (its agent reports the same); from ADMIN with another key, refused at login (key-only); from
    OUTSIDER with the file's key, refused by the firewall before ssh speaks (the rules admit ADMIN on port 22
    only)."""
    rules = cluster.blob("firewall_sha256")
    assert f"elements = {{ {ADMIN} }}" in rules
    assert f"tcp dport {{ {SSH}, {NODE_METRICS} }} ip saddr @admins4 accept" in rules
    text = cluster.text()
    assert "builder-node: ssh host key made for this boot (no cache disk)" in text
    with cluster.ns.inside():
        key = host_key("127.0.0.1")  # the agent's answer, through QEMU's forward of its port
    assert key is not None and fingerprint(key) == host_fingerprint(cluster)
    known_hosts = cluster.folder / "known_hosts"
    known_hosts.write_text(f"{ADMIN} {key}\n{OUTSIDER} {key}\n")
    admitted = ssh(cluster, ADMIN, cluster.admin_key, known_hosts)
    assert admitted.returncode == 0 and admitted.stdout.strip() == "node1", admitted.stdout + admitted.stderr
    other = cluster.folder / "other_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True, timeout=60)
    refused = ssh(cluster, ADMIN, other, known_hosts)
    assert refused.returncode == 255 and "Permission denied (publickey)" in refused.stderr, refused.stderr
    outside = ssh(cluster, OUTSIDER, cluster.admin_key, known_hosts)
    assert outside.returncode == 255 and "Permission denied" not in outside.stderr, outside.stderr
    assert re.search(r"Connection (closed|reset)|kex_exchange_identification", outside.stderr), outside.stderr


# A GPU's sysfs as amdgpu writes it (values of a Strix Halo card under load): the node has no GPU under QEMU, so
# the exporter on the node reads this stand-in through --path.sysfs; its devices/ (CPUs) is the node's own.
FAKE_GPU = {"class/drm/card0/device/uevent": "DRIVER=amdgpu\nPCI_ID=1002:1586",
            "class/drm/card0/device/gpu_busy_percent": "37", "class/drm/card0/device/mem_busy_percent": "5",
            "class/drm/card0/device/mem_info_vram_total": "68719476736",
            "class/drm/card0/device/mem_info_vram_used": "1073741824",
            "class/drm/card0/device/mem_info_gtt_total": "1000", "class/drm/card0/device/mem_info_gtt_used": "10",
            "class/hwmon/hwmon0/name": "amdgpu", "class/hwmon/hwmon0/power1_average": "42500000"}


def test_node_metrics_reach_the_admins_only(cluster: Cluster) -> None:
    """The node's exporter (admins.metrics_port) answers ADMIN with the node's own metrics and is refused to
    OUTSIDER by the firewall. The same script, run over ssh on the node against a stand-in GPU sysfs (QEMU has
    no GPU), reports the GPU's use, memory and power as Prometheus metrics."""
    with cluster.ns.inside():
        metrics = requests.get(f"http://{ADMIN}:{NODE_METRICS}/metrics", timeout=60)
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://{OUTSIDER}:{NODE_METRICS}/metrics", timeout=60)
    assert metrics.status_code == 200
    assert re.search(r"^node_memory_MemTotal_bytes \d", metrics.text, re.M), metrics.text[:2000]
    assert 'node_scrape_collector_success{collector="drm"} 1' in metrics.text
    with cluster.ns.inside():
        key = host_key("127.0.0.1")
    known_hosts = cluster.folder / "known_hosts_metrics"
    known_hosts.write_text(f"{ADMIN} {key}\n")
    files = "; ".join(f"mkdir -p /tmp/gpu/{Path(name).parent} && printf '%s\\n' {shlex.quote(value)} >/tmp/gpu/{name}"
                      for name, value in FAKE_GPU.items())
    script = (f"{files}; ln -s /sys/devices /tmp/gpu/devices; "
              "(/usr/lib/builder/metrics 127.0.0.1 9101 /tmp/gpu >/tmp/gpu.log 2>&1 &); "
              "for i in $(seq 1 60); do /usr/lib/builder/busybox wget -q -O - http://127.0.0.1:9101/metrics "
              "2>/dev/null | grep -E '^node_(drm|hwmon)_' && exit 0; sleep 1; done; "
              "cat /tmp/gpu.log >&2; /usr/lib/builder/busybox wget -O - http://127.0.0.1:9101/metrics 2>&1 "
              "| head -c 2000 >&2; exit 1")
    gpu = ssh(cluster, ADMIN, cluster.admin_key, known_hosts, script)
    assert gpu.returncode == 0, gpu.stdout + gpu.stderr
    lines = gpu.stdout.splitlines()
    assert 'node_drm_gpu_busy_percent{card="card0"} 37' in lines, gpu.stdout
    assert 'node_drm_memory_vram_used_bytes{card="card0"} 1.073741824e+09' in lines, gpu.stdout
    assert 'node_drm_memory_vram_size_bytes{card="card0"} 6.8719476736e+10' in lines, gpu.stdout
    assert 'node_hwmon_power_average_watt{chip="amdgpu",sensor="power1"} 42.5' in lines, gpu.stdout


def test_gateway_puts_every_service_in_rotation(cluster: Cluster, gateway: Gateway,
                                               artifacts: dict[str, object]) -> None:
    """`cluster up` returns once HAProxy's health checks pass for every server (three on the node, one on the
    host); `status` shows each process as the gateway sees it, the node's RPC worker by a connection, and the
    node's state as its agent reports it: the current generation, the cpu image, its device and qualification."""
    assert gateway.lines["endpoint"] == f"http://127.0.0.1:{GATEWAY}/v1"
    assert gateway.lines["models"] == "tiny, tiny-b, tiny-split, tiny-rpc"
    status = cli(cluster, "cluster", "status", str(cluster.path), "--json", "--root", str(cluster.root))
    document = json.loads(status.stdout)
    assert document["gateway"]["running"] is True
    # exit 1 for the one process the control node cannot see here: worker1 is the guest's 10.0.2.2 (below)
    assert status.returncode == 1 and document["problems"] == ["tiny-split rpc-worker on worker1 is DOWN"], \
        status.stdout + status.stderr
    processes = {s["name"]: [(p["node"], p["role"], p["address"], p["health"], p.get("last_check"))
                             for p in s["processes"]] for s in document["services"]}
    assert processes["tiny"] == [("node1", "server", f"127.0.0.1:{TINY}", "UP", "L7OK")]
    assert processes["tiny-b"] == [("node1", "server", f"127.0.0.1:{TINY_B}", "UP", "L7OK")]
    assert processes["tiny-split"][0] == ("node1", "server", f"127.0.0.1:{SPLIT}", "UP", "L7OK")
    # worker1's health is not asserted: it is the guest's 10.0.2.2, which the control node's probe cannot reach
    assert processes["tiny-split"][1][:3] == ("worker1", "rpc-worker", f"10.0.2.2:{HOST_RPC}")
    # node1's RPC worker on the data network, which the control node (the namespace) is on: its tap
    assert processes["tiny-rpc"] == [("host1", "server", f"{MEMBER}:{RPC_HEAD}", "UP", "L7OK"),
                                     ("node1", "rpc-worker", f"{NODE_DATA}:{NODE_RPC}", "UP", None)]
    # node1's ssh host key and units as its agent reports them; the two nodes that are containers run neither
    # (the two containers standing for nodes are asked too: they have no agent)
    units = {f"builder-process@{name}.service": "active/running"
             for name in ("tiny-rpc-rpc-worker", "tiny-server", "tiny-b-server", "tiny-split-server")}
    units.update({f"builder-{name}.service": "active/running" for name in ("dhcp", "agent", "sshd", "metrics")})
    units.update({"builder-qualify.service": "active/exited", "systemd-journal-gatewayd.socket": "active/listening"})
    state = document["nodes"][0].pop("state")
    no_agent = {"state": None, "state_why": "its agent does not answer", "state_malformed": False}
    assert document["nodes"] == [
        {"name": "node1", "address": "127.0.0.1", "target": "cpu", "devices": {}, "mac": MAC,
         "ssh_host_key": host_fingerprint(cluster), "units": units},
        {"name": "worker1", "address": "10.0.2.2", "target": "cpu", "devices": {},
         "mac": "52:54:00:12:34:57", "ssh_host_key": None, "units": None, **no_agent},
        {"name": "host1", "address": MEMBER, "target": "cpu", "devices": {}, "mac": "52:54:00:12:34:58",
         "ssh_host_key": None, "units": None, **no_agent}]
    # node1's state: the generation `pxe publish` made current (its boot files' root, plan and firewall), the
    # image its root was made from, the CPU device ready and the qualification passed on it
    current = publish.current_id(cluster.root)
    words = dict(w.split("=", 1) for w in cluster.words() if "=" in w)
    assert state["generation"] == {"expected": current, "pinned": False, "running": current}, state
    assert state["boot"] == {"root": words["builder.sha256"], "plan": words["builder.plan_sha256"],
                             "firewall": words["builder.firewall_sha256"]}, state
    digest = str(artifacts["image_digest"])
    assert state["image"] == {"digest": digest, "name": artifacts["image"]}, state
    assert state["device"]["state"] == "ready" and state["device"]["devices"] == ["CPU"], state
    assert state["device"]["why"].startswith("llama.cpp lists CPU ("), state
    assert state["qualification"] == {"state": "qualified", "device": "CPU",
                                      "why": "CPU gives the ids recorded on CPU"}, state
    text = cli(cluster, "cluster", "status", str(cluster.path), "--root", str(cluster.root)).stdout
    assert "node     node1        127.0.0.1" in text and "  node1        server     127.0.0.1:" in text
    assert re.search(r"^  node1 +unit +builder-process@tiny-server\.service +active/running$", text, re.M), text
    assert f"  node1        generation {current} (current {current})" in text.splitlines(), text
    assert f"  node1        image      {digest} ({artifacts['image']})" in text.splitlines(), text
    assert re.search(r"^  node1 +device +ready \(lists CPU\): llama\.cpp lists CPU \(", text, re.M), text
    assert "  node1        qualify    qualified on CPU: CPU gives the ids recorded on CPU" in text.splitlines(), text


def test_replicas_answer_through_the_gateway(cluster: Cluster, gateway: Gateway) -> None:
    """Each replica's name through the gateway gives the tiny model's greedy text; each llama-server runs as
    local mode runs it (the service's name as alias, with metrics); the gateway lists the services and
    refuses a request without the key."""
    url = f"http://127.0.0.1:{GATEWAY}/v1"
    for name, port in (("tiny", TINY), ("tiny-b", TINY_B)):
        resp = completion(cluster.ns, f"{url}/completions", name, gateway.key)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"] == cluster.expected
        with cluster.ns.inside():
            direct = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()
            metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        assert direct["data"][0]["id"] == name and "llamacpp:" in metrics
    with cluster.ns.inside():
        listed = requests.get(f"{url}/models", headers={"Authorization": f"Bearer {gateway.key}"}, timeout=30)
    assert [m["id"] for m in listed.json()["data"]] == ["tiny", "tiny-b", "tiny-split", "tiny-rpc"]
    refused = completion(cluster.ns, f"{url}/completions", "tiny")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


def test_split_head_on_the_node_uses_its_worker_on_the_host(cluster: Cluster, gateway: Gateway) -> None:
    """tiny-split: the node is the head (llama-server with --rpc from its plan), its RPC worker a container on
    the host. Through the gateway the greedy text equals the single-node text, and the worker served the head."""
    resp = completion(cluster.ns, f"http://127.0.0.1:{GATEWAY}/v1/completions", "tiny-split", gateway.key)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == cluster.expected
    log = cluster.worker_log.read_text(errors="replace")
    assert "Accepted client connection" in log, log[-2000:]


def test_node_worker_serves_a_head_on_the_host(cluster: Cluster, head: Path, gateway: Gateway) -> None:
    """tiny-rpc: the node's RPC worker holds every layer of a head on the host (BIOS firmware; UEFI boots in
    test_netboot_qemu's corrupted-root test), over the data network: the host side of the tap (MTU 9000) has
    carried more bytes to the node than the worker's share of the model. The head's text, asked directly and
    through the gateway, equals the single-node text."""
    direct = completion(cluster.ns, f"http://{MEMBER}:{RPC_HEAD}/v1/completions")
    assert direct.status_code == 200, direct.text
    assert direct.json()["choices"][0]["text"] == cluster.expected
    through = completion(cluster.ns, f"http://127.0.0.1:{GATEWAY}/v1/completions", "tiny-rpc", gateway.key)
    assert through.status_code == 200, through.text
    assert through.json()["choices"][0]["text"] == cluster.expected
    log = head.read_text(errors="replace")
    share = re.search(rf"RPC0\[{re.escape(NODE_DATA)}:{NODE_RPC}\] model buffer size = +([0-9.]+) MiB", log)
    assert "offloaded 5/5 layers" in log and share, log[-3000:]
    mtu, sent, received = tap_bytes(cluster.ns)
    print(f"data network: {sent} bytes to node1, {received} from it; the worker's share {share.group(1)} MiB")
    assert mtu == DATA_MTU and sent > float(share.group(1)) * (1 << 20), (mtu, sent, share.group(1))


def test_cluster_down_stops_the_gateway(cluster: Cluster, gateway: Gateway) -> None:
    """Last: it changes the cluster. `down` stops the gateway (the node keeps running) and `status` says so."""
    down = cli(cluster, "cluster", "down", str(cluster.path))
    assert down.returncode == 0 and "removed gateway" in down.stdout, down.stdout + down.stderr
    status = cli(cluster, "cluster", "status", str(cluster.path), "--json")
    document = json.loads(status.stdout)
    assert document["gateway"]["running"] is False
    assert status.returncode == 1 and document["problems"][0] == "the gateway is not running", status.stdout


def journal_answer(cluster: Cluster, source: str, host: str) -> str:
    """What node1's journal port answers a GET from `source` to `host` (QEMU's forward): `HTTP/1.1 200 OK` or the
    first line of another answer, `closed` when the connection ends without one, else the error's name."""
    try:
        with cluster.ns.inside(), socket.create_connection((host, JOURNAL), timeout=60,
                                                           source_address=(source, 0)) as conn:
            conn.sendall(b"GET /machine HTTP/1.0\r\n\r\n")
            first = conn.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
            return first or "closed"
    except OSError as exc:
        return type(exc).__name__


def test_cluster_logs_reads_the_node_journal(cluster: Cluster) -> None:
    """Before the reboot: `cluster logs FILE node1` (without --local, without ssh) reads node1's journal over HTTP
    (systemd-journal-gatewayd on the node's address, port 19531): the node's own units' lines (the ssh server's
    ready line, systemd's own lines); `cluster logs FILE node1 tiny` shows that llama-server's unit, its listening
    line and its ready line, not tiny-b's; the same lines are on the console. A service the node does not run is
    one line, exit 2. `-f` follows until Ctrl-C, which ends it with exit 0. The journal port answers the control
    node (127.0.0.1, which the guest sees as 10.0.2.2) and refuses OUTSIDER at once (the node's firewall)."""
    node_log = cli(cluster, "cluster", "logs", str(cluster.path), "node1", "-n", "500", timeout=180)
    assert node_log.returncode == 0, node_log.stdout + node_log.stderr
    assert re.search(r"^builder-node: ssh server ready on 10\.0\.2\.15:22", node_log.stdout, re.M), node_log.stdout
    assert re.search(r"^Started builder-process@tiny-server\.service", node_log.stdout, re.M) or \
        "Started builder process tiny-server" in node_log.stdout, node_log.stdout
    assert "srv " not in node_log.stdout  # the servers' own output is in their units' entries, not the node's
    tiny = cli(cluster, "cluster", "logs", str(cluster.path), "node1", "tiny", "-n", "2000", timeout=180)
    assert tiny.returncode == 0, tiny.stdout + tiny.stderr
    listening = f"listening on http://10.0.2.15:{TINY}"  # llama-server's line once it accepts requests
    assert listening in tiny.stdout and f"builder-node: node1 server tiny ready on 10.0.2.15:{TINY}" in tiny.stdout
    assert f"listening on http://10.0.2.15:{TINY_B}" not in tiny.stdout  # tiny-b's is its own
    assert listening in cluster.text()  # the console keeps it too
    last = cli(cluster, "cluster", "logs", str(cluster.path), "node1", "tiny", "-n", "3", timeout=180)
    assert last.returncode == 0 and len(last.stdout.splitlines()) <= 3, last.stdout
    missing = cli(cluster, "cluster", "logs", str(cluster.path), "node1", "tiny-rpc-nope")
    assert missing.returncode == 2 and "no service named 'tiny-rpc-nope'" in missing.stderr, missing.stderr
    # -f: the lines come as they are, Ctrl-C (SIGINT) ends it with exit 0 and no error
    with cluster.ns.inside():
        follow = subprocess.Popen([sys.executable, "-m", "builder", "cluster", "logs", str(cluster.path), "node1",
                                   "tiny", "-f", "-n", "2000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=ROOT)
    watchdog = threading.Timer(180, follow.kill)  # bounds the reading below: a killed process ends its output
    watchdog.start()
    try:
        assert follow.stdout is not None
        seen = ""
        while listening not in seen and (line := follow.stdout.readline()):
            seen += line
        assert listening in seen, seen[-3000:]
        follow.send_signal(signal.SIGINT)
        assert follow.wait(timeout=60) == 0
        assert follow.stderr is not None and "Traceback" not in follow.stderr.read()
    finally:
        watchdog.cancel()
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert journal_answer(cluster, "127.0.0.1", "127.0.0.1") == "HTTP/1.1 200 OK"
    assert journal_answer(cluster, OUTSIDER, OUTSIDER) in ("closed", "ConnectionResetError", "ConnectionRefusedError")


def unit_show(cluster: Cluster, known_hosts: Path, *units: str) -> dict[str, dict[str, str]]:
    """`systemctl show` of node1's `units` over ssh: unit -> {ActiveState, SubState, NRestarts, MainPID}."""
    shown = ssh(cluster, ADMIN, cluster.admin_key, known_hosts,
                "systemctl show --property=Id,ActiveState,SubState,NRestarts,MainPID -- " + " ".join(units))
    assert shown.returncode == 0, shown.stdout + shown.stderr
    out = {}
    for block in shown.stdout.strip().split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        out[fields["Id"]] = fields
    return out


def wait_units(cluster: Cluster, known_hosts: Path, want: str, *units: str) -> dict[str, dict[str, str]]:
    """Poll until each unit's ActiveState is `want` (bounded: 90 tries, 2 s apart)."""
    for _ in range(90):
        states = unit_show(cluster, known_hosts, *units)
        if all(states[u]["ActiveState"] == want for u in units):
            return states
        time.sleep(2)
    pytest.fail(f"{units} not {want}: {states}\n{cluster.text()[-3000:]}")


def test_a_killed_process_restarts_only_its_unit_and_status_sees_a_stopped_one(cluster: Cluster) -> None:
    """Each process of the plan is a unit of its own, tiny's bounded by its service's memory (MemoryMax=):
    llama-server of tiny killed on the node (over ssh) comes back in its unit alone (its restart count 1, the
    others' 0; the node says so and it is ready again). A unit stopped by hand makes `cluster status` exit 1
    naming it; started again, it is back in the report (and serving, for the tests after this one)."""
    with cluster.ns.inside():
        key = host_key("127.0.0.1")
    known_hosts = cluster.folder / "known_hosts_units"
    known_hosts.write_text(f"{ADMIN} {key}\n")
    names = [f"builder-process@{n}.service" for n in ("tiny-server", "tiny-b-server", "tiny-split-server",
                                                      "tiny-rpc-rpc-worker")]
    before = unit_show(cluster, known_hosts, *names)
    assert all(before[n]["ActiveState"] == "active" for n in names), before
    limits = ssh(cluster, ADMIN, cluster.admin_key, known_hosts, f"systemctl show --property=MemoryMax -- {names[0]} "
                 f"{names[1]}")  # the plan's memory line: tiny's unit only
    assert limits.stdout.split() == [f"MemoryMax={256 << 20}", "MemoryMax=infinity"], limits.stdout + limits.stderr
    ready_lines = cluster.text().count(f"builder-node: node1 server tiny ready on 10.0.2.15:{TINY}")
    killed = ssh(cluster, ADMIN, cluster.admin_key, known_hosts, f"kill -9 {before[names[0]]['MainPID']}")
    assert killed.returncode == 0, killed.stderr
    for _ in range(90):
        after = unit_show(cluster, known_hosts, *names)
        if after[names[0]]["NRestarts"] == "1" and after[names[0]]["ActiveState"] == "active":
            break
        time.sleep(2)
    assert after[names[0]]["NRestarts"] == "1" and after[names[0]]["MainPID"] != before[names[0]]["MainPID"], after
    assert [after[n]["NRestarts"] for n in names[1:]] == [before[n]["NRestarts"] for n in names[1:]], after
    assert [after[n]["MainPID"] for n in names[1:]] == [before[n]["MainPID"] for n in names[1:]], after
    wait_for(cluster.console, r"builder-node: server tiny exited \(signal: killed KILL\)", cluster.vm, 60)
    assert cluster.text().count(f"builder-node: node1 server tiny ready on 10.0.2.15:{TINY}") == ready_lines + 1
    stopped = ssh(cluster, ADMIN, cluster.admin_key, known_hosts, f"systemctl stop {names[1]}")
    assert stopped.returncode == 0, stopped.stderr
    try:
        status = cli(cluster, "cluster", "status", str(cluster.path), "--json")
        document = json.loads(status.stdout)
        assert status.returncode == 1 and f"{names[1]} on node1 is inactive/dead" in document["problems"], \
            status.stdout
        # the node's last error is the kill (a stop asked for is none), as the node printed it
        assert document["nodes"][0]["state"]["last_error"] == \
            "server tiny exited (signal: killed KILL); systemd restarts it", document["nodes"][0]
    finally:
        started = ssh(cluster, ADMIN, cluster.admin_key, known_hosts, f"systemctl start {names[1]}")
        assert started.returncode == 0, started.stderr
    wait_units(cluster, known_hosts, "active", names[1])
    status = cli(cluster, "cluster", "status", str(cluster.path), "--json")
    assert not [p for p in json.loads(status.stdout)["problems"] if ".service on node1 is" in p], status.stdout


@dataclass(frozen=True)
class Sample:
    at: float
    tiny: dict[str, tuple[str, str, int]]  # tiny's servers: node -> (status, last check, requests so far)


def test_cluster_roll_moves_node1_to_a_new_generation(cluster: Cluster, gateway: Gateway) -> None:
    """Very last: it reboots the node. A second generation is published from a changed file: tiny-b's context
    256 -> 512, tiny gets a second replica (a container on the host, at host1), and the two nodes that are
    containers lose their mac (nobody boots them: the roll moves node1 alone). The gateway is started again for it
    (the test before took it down). `builder cluster roll FILE --canary node1 --generation ID` drains node1, pins it
    to the new generation and reboots it over ssh with the file's key (admins:): on first contact it pins the host
    key the node's agent reports, the one the node printed. QEMU runs with -no-reboot, so the machine ends; the
    test powers it on again (same NICs, a fresh console) and node1 netboots the generation it is pinned to; the
    roll waits until its servers pass their health checks, enables it, makes the generation current and clears
    the pins. Meanwhile a bounded loop of requests for tiny through the gateway: none fails, at least one completes
    while node1 is out of the rotation, which takes no request from the drain to the enable, and every sample of
    the gateway has a replica of tiny in the rotation. Last, `builder cluster reboot` ends the node for good."""
    first = publish.current_id(cluster.root)
    old_plan = next(w for w in cluster.words() if w.startswith("builder.plan_sha256="))
    doc = yaml.safe_load(cluster.path.read_text())
    for entry in doc["nodes"]:
        if entry["name"] != "node1":
            del entry["mac"]
    for service in doc["services"]:
        if service["name"] == "tiny-b":
            service["context"] = 512
        if service["name"] == "tiny":
            service["nodes"] = ["node1", "host1"]
    cluster.path.write_text(yaml.safe_dump(doc))
    publishing = cli(cluster, "pxe", "publish", str(cluster.path), "--root", str(cluster.root), "--engine", "podman",
                     timeout=1800)
    assert publishing.returncode == 0, publishing.stdout + publishing.stderr
    second = publish.current_id(cluster.root)
    assert second is not None and second != first
    new_plan = next(w for w in cluster.words() if w.startswith("builder.plan_sha256="))
    assert new_plan != old_plan
    # published, not yet rolled: node1 still runs the first generation, which `status` counts as a problem
    status = cli(cluster, "cluster", "status", str(cluster.path), "--json", "--root", str(cluster.root))
    assert status.returncode == 1 and f"node1 runs generation {first}, not {second} (the current one): reboot it" \
        in json.loads(status.stdout)["problems"], status.stdout
    replica = f"builder-shared-tiny-host-{os.getpid()}"
    with container("podman", cluster.folder, replica, "server", "-m", str(cluster.folder / "tiny.gguf"), "-c", "256",
                   "-t", "2", "--alias", "tiny", "--host", MEMBER, "--port", str(TINY), prefix=cluster.ns.enter), \
            ExitStack() as stack:
        up = cli(cluster, "cluster", "up", str(cluster.path), "--timeout", "300", timeout=400)
        assert up.returncode == 0, up.stdout + up.stderr
        key = Path(dict(line.split(None, 1) for line in up.stdout.splitlines() if line.strip())["key"].split()[0]
                   ).read_text().strip()
        sock = runtime.socket_path(Remote.of(load_cluster(cluster.path)).state)
        url = f"http://127.0.0.1:{GATEWAY}/v1/completions"
        samples: list[Sample] = []
        answers: list[tuple[float, float, int]] = []  # (sent, answered, HTTP status; 0: no answer)
        lines: list[tuple[float, str]] = []
        done = threading.Event()
        deadline = time.monotonic() + 1500

        def sample() -> None:
            while not done.is_set() and time.monotonic() < deadline and len(samples) < 5000:
                tiny = {s.node: (s.status, s.check, s.total) for s in runtime.servers(sock) if s.backend == "svc_tiny"}
                samples.append(Sample(time.monotonic(), tiny))
                time.sleep(0.5)

        def ask() -> None:
            while not done.is_set() and time.monotonic() < deadline and len(answers) < 3000:
                sent = time.monotonic()
                try:
                    status = completion(cluster.ns, url, "tiny", key).status_code
                except requests.RequestException:
                    status = 0
                answers.append((sent, time.monotonic(), status))
                time.sleep(0.2)

        threads = [threading.Thread(target=sample), threading.Thread(target=ask)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        try:
            with cluster.ns.inside():
                roll = subprocess.Popen([sys.executable, "-m", "builder", "cluster", "roll", str(cluster.path),
                                         "--canary", "node1", "--generation", second, "--root", str(cluster.root),
                                         "--identity", str(cluster.admin_key), "--timeout", "900"],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
            stack.callback(lambda: roll.poll() is None and roll.kill())

            def read() -> None:
                assert roll.stdout is not None
                for line in roll.stdout:
                    lines.append((time.monotonic(), line.rstrip("\n")))
            reader = threading.Thread(target=read)
            reader.start()
            # the ssh reboot ends node1's QEMU (-no-reboot); power it on again, as the board's button would
            while cluster.vm.poll() is None and roll.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            assert cluster.vm.poll() == 0, "\n".join(line for _, line in lines)
            powered = time.monotonic()
            again = stack.enter_context(node(cluster.root / "tftp", MAC, cluster.folder / "console-roll.log",
                                             hostfwd=FORWARDS, prefix=cluster.ns.enter, cpus=1, tap=(TAP, DATA_MAC)))
            roll.wait(timeout=1200)
            reader.join(timeout=60)
        finally:
            done.set()
            for thread in threads:
                thread.join(timeout=400)
        output = [line for _, line in lines]
        assert roll.returncode == 0, "\n".join(output)
        at = {line: t for t, line in reversed(lines)}
        print(f"roll of node1: {at['node1: rebooting'] - at['node1: draining']:.1f} s drain and pin, QEMU ended "
              f"{powered - at['node1: rebooting']:.1f} s after the reboot command, down -> serving and enabled "
              f"{at['node1: serving, enabled'] - powered:.1f} s after power-on, {time.monotonic() - started:.0f} s in "
              f"all; {len(answers)} requests, {len(samples)} samples")
        assert f"first contact with node1: its host key {host_fingerprint(cluster)}" in "\n".join(output), output
        assert f"== node1: generation {first} -> {second}" in output, output
        assert f"node1: boots generation {second} from its next boot" in output, output
        assert "node1: rebooting" in output and "node1: serving, enabled" in output, output
        assert output[-1] == f"every node runs generation {second}: it is current, the pins are cleared", output
        assert "reboot: Restarting system" in cluster.text()
        wait_for(cluster.folder / "console-roll.log", r"builder-node: node1 server tiny ready on ", again, 60)
        assert publish.current_id(cluster.root) == second and publish.pins(cluster.root) == {}
        status = cli(cluster, "cluster", "status", str(cluster.path), "--json", "--root", str(cluster.root))
        rolled = json.loads(status.stdout)
        assert rolled["nodes"][0]["state"]["generation"] == {"expected": second, "pinned": False,
                                                             "running": second}, rolled["nodes"][0]
        assert not [p for p in rolled["problems"] if p.startswith("node1")], rolled["problems"]
        # zero failed requests; one at least answered while node1 was out of the rotation
        assert answers and all(status == 200 for _, _, status in answers), answers
        drained = [s for s in samples if s.tiny["node1"][0] != "UP"]
        assert drained and any(s.tiny["node1"][0] == "DOWN" for s in drained), samples[-5:]
        out_from, out_to = drained[0].at, drained[-1].at
        assert all(s.tiny["node1"][0] != "UP" for s in samples if out_from <= s.at <= out_to), "enabled mid-roll"
        assert len({s.tiny["node1"][2] for s in drained}) == 1, "node1 took a request while drained"
        assert any(out_from <= sent and answered <= out_to for sent, answered, _ in answers), (out_from, out_to)
        # at every sample a replica of tiny was in the rotation and passed its health check
        assert all(any(status == "UP" and check == "L7OK" for status, check, _ in s.tiny.values())
                   for s in samples), [s for s in samples if not any(v[0] == "UP" for v in s.tiny.values())][:3]
        # node1 is back in the rotation: it takes requests again (least connections: it gets the next ones)
        before = runtime.node_servers(sock, "node1")
        assert all(s.status == "UP" and s.check == "L7OK" for s in before), before
        for _ in range(6):
            assert completion(cluster.ns, url, "tiny", key).status_code == 200
        taken = {s.backend: s.total for s in runtime.node_servers(sock, "node1")}["svc_tiny"]
        assert taken > next(s.total for s in before if s.backend == "svc_tiny"), taken
        # node1 runs the new generation: its kernel command line names the new plan, and tiny-b serves its context
        with cluster.ns.inside():
            props = requests.get(f"http://127.0.0.1:{TINY_B}/props", timeout=60).json()
            host = host_key("127.0.0.1")
        assert props["default_generation_settings"]["n_ctx"] == 512, props
        known_hosts = cluster.folder / "known_hosts_roll"
        known_hosts.write_text(f"{ADMIN} {host}\n")
        cmdline = ssh(cluster, ADMIN, cluster.admin_key, known_hosts, "cat /proc/cmdline")
        assert cmdline.returncode == 0 and new_plan in cmdline.stdout.split(), cmdline.stdout + cmdline.stderr
        # `cluster reboot` ends the rolled node (no third boot): from the control node with the file's key, through a
        # copy of the file (builder pins a host key per file, and the roll pinned the first boot's), it pins on first
        # contact the key the node printed at this boot, then reboots it
        path = cluster.folder / "cluster-reboot.yaml"
        shutil.copyfile(cluster.path, path)
        printed = host_fingerprint(cluster, cluster.folder / "console-roll.log")
        proc = cli(cluster, "cluster", "reboot", str(path), "node1", "--identity", str(cluster.admin_key), timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"first contact with node1: its host key {printed}" in proc.stdout, proc.stdout
        assert proc.stdout.splitlines()[-1] == "rebooting node1 (127.0.0.1): it netboots its current generation"
        assert again.wait(timeout=120) == 0
        assert "reboot: Restarting system" in (cluster.folder / "console-roll.log").read_text(errors="replace")
