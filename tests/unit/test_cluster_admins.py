"""admins: in a cluster file: hostile keys and addresses refused in one line, the plan's admin-key and ssh lines,
the node's firewall admitting exactly the admins' addresses on exactly the ssh port (loaded in a network
namespace of the test's own), the node's sshd config, and the ssh command line `cluster reboot` runs."""

import base64
import random
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_cluster_firewall import CONNECT, NODE_A, NODE_B, OUTSIDER, nft_check, services_file

from builder.cluster.firewall import firewalls
from builder.cluster.plans import node_plan
from builder.cluster.ssh import Target, fingerprint, pin_host_key, ssh_argv
from builder.netboot.firewall import ruleset
from builder.netboot.initramfs import NODE_SCRIPTS
from builder.netboot.nodeunits import JOURNAL_PORT
from builder.netboot.plan import AGENT_PORT, AdminKeyLine, AgentLine, MetricsLine, NodePlan, SshLine, parse, serialize
from conftest import require_tool, run_cli_inproc

ADMIN_NET = "192.168.7.0/24"
ADMIN_HOST = "192.168.7.20"


def blob(kind: str, *parts: bytes) -> str:
    data = b"".join(struct.pack(">I", len(p)) + p for p in (kind.encode(), *parts))
    return base64.b64encode(data).decode()


RSA_1024 = f"ssh-rsa {blob('ssh-rsa', bytes([1, 0, 1]), bytes(1) + bytes([0x80]) + bytes(127))} x"
ED25519 = f"ssh-ed25519 {blob('ssh-ed25519', bytes(range(32)))} alice@laptop"


def admins_file(tmp_path: Path, **admins: Any) -> Path:
    return services_file(tmp_path, admins={"keys": [ED25519], "addresses": [ADMIN_NET], **admins})


def refusal(tmp_path: Path, path: Path) -> str:
    proc = run_cli_inproc("cluster", "firewall", str(path), "--out", str(tmp_path / "rules"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "rules").exists()  # nothing half-written
    return proc.stderr.splitlines()[0]


@pytest.mark.parametrize(("key", "message"), [
    (f'command="/bin/sh" {ED25519}', "authorized_keys options (command=, from=, ...) are not taken"),
    (f"from=\"10.0.0.1\" {ED25519}", "not a key type"),
    (f"{ED25519}\nssh-ed25519 AAAA other", "one line without control characters"),
    (f"{ED25519}\x00", "one line without control characters"),
    ("ssh-ed25519 !!!notbase64 x", "second word must be its base64 blob"),
    ("ssh-ed25519 QUJD x", "does not decode"),
    (f"ssh-ed25519 {blob('ssh-rsa', bytes(40))} x", "is not a ssh-ed25519 key"),
    (RSA_1024, "RSA key of 1024 bits is too weak"),
    (f"ssh-dss {blob('ssh-dss', bytes(40))} x", "not a key type"),
    ("ssh-ed25519", "second word must be its base64 blob"),
])
def test_a_hostile_key_is_one_line(tmp_path: Path, key: str, message: str) -> None:
    first = refusal(tmp_path, services_file(tmp_path, admins={"keys": [key], "addresses": [ADMIN_NET]}))
    assert first.startswith("error: ") and "admins.keys" in first and message in first, first


@pytest.mark.parametrize(("address", "message"), [
    ("192.168.7.1/24", "has host bits set"),
    ("0.0.0.0/0", "is every address"),
    ("::/0", "is every address"),
    ("admin.lan", "an IP address or network"),
    ("fe80::1%eth0", "without spaces or zones"),
    ("10.0.0.1 10.0.0.2", "without spaces or zones"),
])
def test_an_address_that_is_not_one_is_one_line(tmp_path: Path, address: str, message: str) -> None:
    first = refusal(tmp_path, services_file(tmp_path, admins={"keys": [ED25519], "addresses": [address]}))
    assert "admins.addresses" in first and message in first, first


def test_the_admins_ports_are_the_ssh_servers_and_the_exporters_alone(tmp_path: Path) -> None:
    first = refusal(tmp_path, admins_file(tmp_path, ssh_port=9000))
    assert "admins.ssh_port: 9000 is also the port of chat's server on a" in first, first
    first = refusal(tmp_path, admins_file(tmp_path, metrics_port=9000))
    assert "admins.metrics_port: 9000 is also the port of chat's server on a" in first, first
    first = refusal(tmp_path, admins_file(tmp_path, ssh_port=2222, metrics_port=2222))
    assert "ssh_port and metrics_port are both 2222" in first, first


def test_the_plan_carries_public_keys_and_the_port_without_comments(tmp_path: Path) -> None:
    from builder.cluster.model import load_cluster

    loaded = load_cluster(admins_file(tmp_path, ssh_port=2222))
    plan = node_plan(loaded, "b", "http://10.0.0.1:8000", {})
    kind, data, _ = ED25519.split(" ")
    # b runs an RPC worker only, and with admins: the agent all the same: it reports the host key
    assert plan.lines[:4] == (AgentLine(AGENT_PORT), AdminKeyLine(kind, data), SshLine(2222), MetricsLine(9100))
    text = serialize(plan)
    assert "alice@laptop" not in text and f"admin-key\t{kind}\t{data}\n" in text and "ssh\t2222\n" in text
    assert "metrics\t9100\n" in text
    assert parse(text) == plan
    for bad in (AdminKeyLine("ssh-ed25519", "AAAA\tx"), AdminKeyLine("ssh ed25519", "AAAA"), SshLine(0)):
        with pytest.raises(ValueError):
            serialize(NodePlan("b", (bad,)))


def test_the_firewall_admits_the_admins_on_their_ports_only(tmp_path: Path) -> None:
    """Node b's rules loaded in a namespace of the test's own: ADMIN_HOST (in admins' network) reaches port 22
    (and 9100, the exporter's) and not the RPC port; an outsider reaches none; the cluster's own addresses reach
    them all, as before."""
    require_tool("nft", "nftables")
    require_tool("unshare", "util-linux")
    require_tool("ip", "iproute2")
    rules = {f.node: ruleset(f, "cluster.yaml") for f in firewalls(admins_file(tmp_path))}
    assert f"elements = {{ {ADMIN_NET} }}" in rules["b"]
    assert "tcp dport { 22, 9100 } ip saddr @admins4 accept" in rules["b"]
    assert f"the control node's ports ({AGENT_PORT}, {JOURNAL_PORT}: gateway agent, journal)" in rules["b"]
    (tmp_path / "b.nft").write_text(rules["b"])
    assert nft_check(tmp_path / "b.nft").returncode == 0
    (tmp_path / "connect.py").write_text(CONNECT)
    connect = f"{sys.executable} {tmp_path / 'connect.py'} {NODE_B}"
    script = "; ".join([
        "set -e", "ip link set lo up",
        *(f"ip addr add {a}/16 dev lo" for a in (NODE_A, NODE_B, OUTSIDER)), f"ip addr add {ADMIN_HOST}/24 dev lo",
        f"nft -f {tmp_path / 'b.nft'}",
        f"{connect} 22 {ADMIN_HOST} {OUTSIDER} {NODE_A}", f"{connect} 50052 {ADMIN_HOST} {OUTSIDER} {NODE_A}",
        f"{connect} 9100 {ADMIN_HOST} {OUTSIDER}",
    ])
    proc = subprocess.run(["unshare", "--net", "--", "sh", "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-8:] == [
        f"{ADMIN_HOST} connected", f"{OUTSIDER} ConnectionRefusedError", f"{NODE_A} connected",
        f"{ADMIN_HOST} ConnectionRefusedError", f"{OUTSIDER} ConnectionRefusedError", f"{NODE_A} connected",
        f"{ADMIN_HOST} connected", f"{OUTSIDER} ConnectionRefusedError"]


def test_without_admins_no_rule_and_no_ssh_line(tmp_path: Path) -> None:
    from builder.cluster.model import load_cluster

    path = services_file(tmp_path)
    assert all("admins" not in ruleset(f, "cluster.yaml") for f in firewalls(path))
    plan = node_plan(load_cluster(path), "b", "http://10.0.0.1:8000", {})
    assert not any(isinstance(line, AdminKeyLine | SshLine) for line in plan.lines)


def sshd_options() -> dict[str, str]:
    lines = (NODE_SCRIPTS / "sshd_config").read_text().splitlines()
    return dict(line.split(" ", 1) for line in lines if line and not line.startswith("#"))


def test_the_nodes_sshd_takes_keys_only() -> None:
    options = sshd_options()
    assert options["PermitRootLogin"] == "prohibit-password" and options["AllowUsers"] == "root"
    assert options["PasswordAuthentication"] == "no" and options["KbdInteractiveAuthentication"] == "no"
    assert options["AuthenticationMethods"] == "publickey" and options["PermitEmptyPasswords"] == "no"
    assert options["AuthorizedKeysFile"] == "/run/builder/ssh/authorized_keys"
    assert all(options[name] == "no" for name in ("AllowTcpForwarding", "AllowAgentForwarding", "X11Forwarding",
                                                    "PermitTunnel", "PermitUserEnvironment", "UsePAM"))
    assert not any(name in options for name in ("ListenAddress", "HostKey", "Port"))  # sshd.sh gives these


def test_reboot_runs_the_operators_ssh_with_builders_options_only(tmp_path: Path) -> None:
    t = Target("node1", "10.0.0.11", 2222, tmp_path / "known_hosts")
    argv = ssh_argv(t, "/usr/lib/builder/reboot", tmp_path / "id")
    assert argv[:3] == ["ssh", "-F", "none"] and argv[-3:] == ["--", "10.0.0.11", "/usr/lib/builder/reboot"]
    options = [argv[i + 1] for i, word in enumerate(argv) if word == "-o"]
    assert {"BatchMode=yes", "StrictHostKeyChecking=yes", f"UserKnownHostsFile={t.known_hosts}",
            "PasswordAuthentication=no", "IdentitiesOnly=yes", "ForwardAgent=no"} <= set(options)
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-l") + 1] == "root"


def test_the_fingerprint_is_ssh_keygens(tmp_path: Path) -> None:
    require_tool("ssh-keygen", "openssh-client")
    (tmp_path / "key.pub").write_text(ED25519 + "\n")
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(tmp_path / "key.pub")], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert out.split()[1] == fingerprint(ED25519)


def _agent(key: str) -> tuple[str, socket.socket]:
    """A node's agent on a loopback address of its own, at AGENT_PORT, answering `ssh` with KEY."""
    for _ in range(20):
        address = f"127.{random.randrange(1, 255)}.{random.randrange(1, 255)}.{random.randrange(2, 255)}"
        try:
            listener = socket.create_server((address, AGENT_PORT))
            break
        except OSError:
            continue
    else:
        raise AssertionError(f"no free loopback address for an agent on port {AGENT_PORT}")

    def answer() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(16)
                conn.sendall(f"{key}\n".encode())

    threading.Thread(target=answer, daemon=True).start()
    return address, listener


def test_a_node_without_a_cache_disk_is_pinned_again_when_its_key_changed(tmp_path: Path) -> None:
    """A node that keeps its key (a cache disk) is never asked again once pinned: a changed key is ssh's refusal.
    One without a cache disk makes a key every boot: its new key replaces the pinned one, and builder says so."""
    old = f"ssh-ed25519 {blob('ssh-ed25519', bytes(32))}"
    new = ED25519.rsplit(" ", 1)[0]
    address, listener = _agent(new)
    said: list[str] = []
    known = tmp_path / "known_hosts"
    known.write_text(f"10.0.0.9 {old}\n{address} {old}\n")
    try:
        pin_host_key(Target("node1", address, 22, known, keeps_key=True), said.append)
        assert known.read_text() == f"10.0.0.9 {old}\n{address} {old}\n" and said == []
        pin_host_key(Target("node1", address, 22, known, keeps_key=False), said.append)
        assert known.read_text() == f"10.0.0.9 {old}\n{address} {new}\n"
        assert said == [f"node1 has no cache disk, so it made a new ssh host key when it booted: {fingerprint(new)} "
                        "(as its agent reports it; its console printed the same) is pinned now"]
        pin_host_key(Target("node1", address, 22, known, keeps_key=False), said.append)
        assert len(said) == 1  # the same key again: nothing to say
    finally:
        listener.close()


def test_reboot_without_admins_says_how(tmp_path: Path) -> None:
    path = services_file(tmp_path)
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(data))
    proc = run_cli_inproc("cluster", "reboot", str(path), "a")
    assert proc.returncode == 2 and "admins: none, so the nodes run no ssh server" in proc.stderr, proc.stderr
    proc = run_cli_inproc("cluster", "reboot", str(admins_file(tmp_path)), "zz")
    assert proc.returncode == 2 and "no netbooted node named 'zz'" in proc.stderr, proc.stderr



def test_publish_gives_every_node_the_keys_and_refuses_a_set_without_sshd(tmp_path: Path) -> None:
    """`pxe publish` of a file with admins: every netbooted node's plan has the public keys and the ssh line;
    a netboot set made without an ssh server (an older one, or a root builder pins none for) is refused in
    one line, before anything is published."""
    from test_netboot import fake_artifacts
    from test_netboot_services import MACS, cluster_file, plan

    from builder.cluster.plans import load_for_netboot, models, publish_services
    from builder.core.errors import RecipeError

    path = cluster_file(tmp_path, admins={"keys": [ED25519], "addresses": [ADMIN_NET]})
    loaded = load_for_netboot(path)
    folder, manifest = fake_artifacts(tmp_path, "without-ssh")
    with pytest.raises(RecipeError, match="admins: a boots the netboot set cpu-cpu, which has no ssh server"):
        publish_services(tmp_path / "pxe-root", loaded, models(loaded, print), {("cpu", "cpu"): (folder, manifest)},
                         1)
    assert not (tmp_path / "pxe-root" / "current").exists()
    manifest = {**manifest, "ssh": {"suite": "trixie", "packages": {"openssh-server": "1:10.0p1-7"}}}
    publish_services(tmp_path / "pxe-root", loaded, models(loaded, print), {("cpu", "cpu"): (folder, manifest)}, 1)
    kind, data, _ = ED25519.split(" ")
    for mac in MACS[:3]:
        rows = plan(tmp_path / "pxe-root", mac)
        assert ["admin-key", kind, data] in rows and ["ssh", "22"] in rows and ["metrics", "9100"] in rows


def test_export_prometheus_scrapes_every_netbooted_nodes_exporter(tmp_path: Path) -> None:
    out = tmp_path / "prom"
    proc = run_cli_inproc("cluster", "export", str(admins_file(tmp_path, metrics_port=9200)), "--format", "prometheus",
                          "--out", str(out))
    assert proc.returncode == 0 and proc.stdout.startswith(f"wrote prometheus.yml to {out}"), proc.stderr
    config = yaml.safe_load((out / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["job_name"] == "builder-nodes-cluster"
    assert job["static_configs"] == [
        {"targets": [f"{NODE_A}:9200"], "labels": {"node": "a", "target": "cpu"}},
        {"targets": [f"{NODE_B}:9200"], "labels": {"node": "b", "target": "cpu"}},
        {"targets": ["[fd00::13]:9200"], "labels": {"node": "c", "target": "cpu"}}]
    refused = run_cli_inproc("cluster", "export", str(services_file(tmp_path)), "--format", "prometheus", "--out",
                             str(tmp_path / "none"))
    assert refused.returncode == 2 and "admins: none, so the nodes run no exporter" in refused.stderr
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(("os_release", "outcome"), [
    ('ID=debian\nVERSION_CODENAME=trixie\n', "netboot_admin.trixie: the ssh server and exporter of trixie roots are "
                                             "not pinned"),
    ('ID=ubuntu\nVERSION_CODENAME=noble\n', "the root is not Debian"),
    ('ID=debian\nVERSION_CODENAME=forky\n', "netboot_admin.forky: the ssh server and exporter of forky roots are "
                                            "not pinned"),
    ('ID=debian\nVERSION_CODENAME=duke\n', "no ssh server or exporter is pinned for duke roots"),
])
def test_pxe_build_adds_the_layer_of_the_roots_own_suite_or_says_why_not(tmp_path: Path, os_release: str,
                                                                       outcome: str) -> None:
    """A suite builder netboots must be pinned (one line naming `builder lock`); another distribution, or a
    suite builder does not pin, gets no layer, and the set's manifest says why (pxe publish then refuses
    admins: for it)."""
    from builder.core.errors import LockError
    from builder.netboot.adminlayer import add_admin_layer

    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "os-release").write_text(os_release)
    if "pinned for" in outcome or "not Debian" in outcome:
        assert outcome in str(add_admin_layer(tmp_path, {}, "builder.lock")["missing"])
        return
    with pytest.raises(LockError, match=outcome) as raised:
        add_admin_layer(tmp_path, {}, "builder.lock")
    assert "builder lock" in raised.value.hint
