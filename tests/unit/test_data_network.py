"""The data network (issue 21): a node's `data_interface:` and `mtu:` in the cluster file, checked field by field;
what a netbooted node's kernel command line and plan carry for them; where `cluster commands` binds and points
RPC workers; the firewall rules admitting the data addresses, loaded in a namespace with a boot and a data
interface. The QEMU node that boots with two interfaces is tests/qemu/test_netboot_shared_qemu.py."""

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from netns import network_namespace
from test_cluster_firewall import CONNECT
from test_netboot_services import BIG, MACS, cluster_file, plan, published, words
from test_netboot_vllm import model_folder

from builder.cluster.commands import node_commands
from builder.cluster.firewall import firewalls
from builder.cluster.hfmodel import folder_hash
from builder.cluster.model import load_cluster
from builder.cluster.plans import load_for_netboot, node_plan
from builder.netboot.firewall import ruleset
from builder.netboot.plan import VllmLine
from conftest import require_tool, run_cli, run_cli_inproc

DATA_C = {"mac": "52:54:00:aa:00:03", "address": "10.10.0.13/24", "mtu": 9000}
DATA_B = {"name": "enp2s0f0", "address": "10.10.0.12/24", "mtu": 9000}


def with_data(tmp_path: Path, b: dict[str, Any] | None = DATA_B, c: dict[str, Any] | None = DATA_C,
              **extra: Any) -> Path:
    """test_netboot_services' cluster (b is big's head, c its RPC worker) with data interfaces on b and c."""
    path = cluster_file(tmp_path)
    data = yaml.safe_load(path.read_text())
    for node, value in (("b", b), ("c", c)):
        entry = next(n for n in data["nodes"] if n["name"] == node)
        if value is not None:
            entry["data_interface"] = copy.deepcopy(value)
    for node, fields in extra.items():
        if node == "control":
            data["control"] = fields
            continue
        next(n for n in data["nodes"] if n["name"] == node).update(fields)
    path.write_text(yaml.safe_dump(data))
    return path


def refusal(path: Path) -> str:
    """`builder cluster firewall FILE`'s one line on stderr (exit 2), for a file it must refuse."""
    proc = run_cli_inproc("cluster", "firewall", str(path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
    return proc.stderr


@pytest.mark.parametrize("name", ["eth0;reboot", "../eth0", "eth 0", "$(reboot)", "eth0\nx", "a" * 16, "-eth0",
                                  "eth0`id`", ""])
def test_a_hostile_interface_name_is_one_line(tmp_path: Path, name: str) -> None:
    err = refusal(with_data(tmp_path, c={"name": name, "address": "10.10.0.13/24"}))
    assert "nodes[2].data_interface.name" in err and "network interface name" in err


@pytest.mark.parametrize(("address", "why"), [
    ("10.10.0.13", "prefix length"),
    ("10.10.0.0/24", "network address"),
    ("10.10.0.255/24", "broadcast address"),
    ("10.10.0.13/33", "prefix length"),
    ("10.10.0.256/24", "prefix length"),
    ("0.0.0.0/0", "not an address"),
    ("127.0.0.5/8", "not an address"),
    ("224.0.0.5/24", "not an address"),
    ("fe80::1%eth0/64", "zone"),
    ("node-c.example/24", "prefix length"),
    ("10.10.0.13/24 builder.root=x", "prefix length"),
])
def test_a_bad_data_address_is_one_line(tmp_path: Path, address: str, why: str) -> None:
    err = refusal(with_data(tmp_path, c={"mac": "52:54:00:aa:00:03", "address": address}))
    assert "nodes[2].data_interface.address" in err and why in err, err


@pytest.mark.parametrize(("field", "value"), [("mtu", 1279), ("mtu", 65521), ("mtu", 0), ("mtu", "9000x")])
def test_an_mtu_out_of_range_is_one_line(tmp_path: Path, field: str, value: object) -> None:
    err = refusal(with_data(tmp_path, c={**DATA_C, field: value}))
    assert f"nodes[2].data_interface.{field}" in err, err
    err = refusal(with_data(tmp_path, a={"mtu": value}))
    assert "nodes[0].mtu" in err, err


@pytest.mark.parametrize(("change", "says"), [
    ({"c": {"address": "10.10.0.13/24"}}, "by name: or by mac:, one of the two"),
    ({"c": {**DATA_C, "name": "eth1"}}, "by name: or by mac:, one of the two"),
    ({"c": {**DATA_C, "mac": "52:54:00:aa:00"}}, "six hex pairs"),
    ({"c": {**DATA_C, "mac": MACS[2]}}, "nodes[2].data_interface.mac: 52:54:00:12:34:03 is c's boot interface"),
    ({"c": {**DATA_C, "address": "10.10.0.12/24"}}, "nodes[2].data_interface.address: 10.10.0.12 is already b's"),
    ({"c": {**DATA_C, "address": "10.0.2.11/24"}}, "10.0.2.11 is already a's address"),
    ({"b": None}, "services[1].workers[0]: c's RPC worker listens on the data network (10.10.0.13), and its head b "
                  "is not on it"),
    ({"c": {**DATA_C, "address": "10.20.0.13/24"}}, "c's data address 10.20.0.13 is outside b's data network "
                                                    "10.10.0.0/24"),
    ({"c": {**DATA_C, "speed": "fast"}}, "nodes[2].data_interface.speed"),
])
def test_a_data_network_that_cannot_work_is_one_line(tmp_path: Path, change: dict[str, Any], says: str) -> None:
    err = refusal(with_data(tmp_path, **change))
    assert says in err, err


def pipeline_file(tmp_path: Path, y_data: bool) -> Path:
    """A cpu vLLM pipeline over netbooted x and y; x on the data network, y too when `y_data`."""
    sha = folder_hash(model_folder(tmp_path), "test")
    nodes: list[dict[str, Any]] = [{"name": n, "mac": MACS[i], "target": "cpu", "memory": "8GiB",
                                    "address": f"10.0.2.3{i}"} for i, n in enumerate("xy")]
    nodes[0]["data_interface"] = {"name": "eth1", "address": "10.10.0.30/24", "mtu": 9000}
    if y_data:
        nodes[1]["data_interface"] = {"name": "eth1", "address": "10.10.0.31/24", "mtu": 9000}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"control": {"address": "10.0.2.2"}, "nodes": nodes, "services": [
        {"name": "p", "engine": "vllm", "model": "tiny", "sha256": sha, "topology": "pipeline", "nodes": ["x", "y"],
         "port": 8000}]}))
    return path


def test_a_pipeline_is_on_the_data_network_whole_or_not_at_all(tmp_path: Path) -> None:
    err = refusal(pipeline_file(tmp_path, y_data=False))
    assert "services[0].nodes: a pipeline's nodes reach each other on the data network when all of them are on " \
           "it, in one network; x of x, y are" in err, err


def test_a_pipeline_joins_over_the_data_network(tmp_path: Path) -> None:
    """Both nodes on it: rank 1 joins rank 0's data address, each vLLM's host IP is its data address, and the API
    (what the gateway reaches) stays on the boot address."""
    loaded = load_for_netboot(pipeline_file(tmp_path, y_data=True))
    lines = {n: next(line for line in node_plan(loaded, n, "http://10.0.2.2:8000", {"p": "a" * 64}).lines
                     if isinstance(line, VllmLine)) for n in "xy"}
    for name, line in lines.items():
        argv = list(line.argv)
        assert argv[argv.index("--master-addr") + 1] == "10.10.0.30", argv
        assert ("VLLM_HOST_IP", {"x": "10.10.0.30", "y": "10.10.0.31"}[name]) in line.env, line.env
    x = list(lines["x"].argv)
    assert x[x.index("--host") + 1] == "10.0.2.30"


def test_kernel_line_and_plan_carry_the_data_network(tmp_path: Path) -> None:
    """c's command line names its data interface by MAC, its address and MTU; b's by name; a (no data interface)
    carries its boot MTU only; b's plan points its split head at c's data address, and c's RPC worker line is
    unchanged (the node binds it on the data address the initramfs configured)."""
    root = published(tmp_path, with_data(tmp_path, a={"mtu": 1400}))
    c, b, a = words(root, MACS[2]), words(root, MACS[1]), words(root, MACS[0])
    assert [w for w in c if w.startswith(("builder.data", "builder.mtu"))] == [
        "builder.data_mac=52:54:00:aa:00:03", "builder.data_address=10.10.0.13/24", "builder.data_mtu=9000"]
    assert [w for w in b if w.startswith(("builder.data", "builder.mtu"))] == [
        "builder.data_if=enp2s0f0", "builder.data_address=10.10.0.12/24", "builder.data_mtu=9000"]
    assert [w for w in a if w.startswith(("builder.data", "builder.mtu"))] == ["builder.mtu=1400"]
    head = next(line for line in plan(root, MACS[1]) if line[:2] == ["server", "big"])
    assert head[5] == "10.10.0.13:50100"
    assert [line for line in plan(root, MACS[2]) if line[0] == "rpc-worker"] == [["rpc-worker", "big", "50100"]]


def test_without_a_data_interface_nothing_changes(tmp_path: Path) -> None:
    root = published(tmp_path, cluster_file(tmp_path))
    assert not [w for m in MACS[:3] for w in words(root, m) if w.startswith(("builder.data", "builder.mtu"))]
    head = next(line for line in plan(root, MACS[1]) if line[:2] == ["server", "big"])
    assert head[5] == "10.0.2.13:50100"


def test_cluster_commands_bind_workers_on_the_data_network(tmp_path: Path) -> None:
    loaded = load_cluster(with_data(tmp_path))
    argv = {entry.node: entry.argv for entry in node_commands(loaded, "/srv/models")}
    worker = next(a for a in argv["c"] if "rpc-worker" in a)
    assert worker[worker.index("rpc-worker"):] == ("rpc-worker", "--host", "10.10.0.13", "--port", "50100")
    head = next(a for a in argv["b"] if "big" in " ".join(a) and "--rpc" in a)
    assert head[head.index("--rpc") + 1] == "10.10.0.13:50100"
    assert head[head.index("--host") + 1] == "10.0.2.12"  # the server stays on the boot network
    assert BIG  # the split's model, published as in test_netboot_services


def test_firewall_covers_both_interfaces(tmp_path: Path) -> None:
    """c's rules admit every node's boot and data address and the control node. Loaded in a namespace of its own
    where c has a boot interface and a data interface (two taps, each with its addresses), a server on c's data
    address (its RPC worker) accepts b over the data network and the control node, and refuses an outsider on
    the data network's subnet; on its boot address the same holds for b's boot address and an outsider there."""
    require_tool("nft", "nftables")
    require_tool("unshare", "util-linux")
    require_tool("ip", "iproute2")
    rules = {f.node: ruleset(f, "cluster.yaml") for f in firewalls(with_data(tmp_path))}
    assert "elements = { 10.0.2.2, 10.0.2.11, 10.0.2.12, 10.0.2.13, 10.10.0.12, 10.10.0.13 }" in rules["c"]
    (tmp_path / "c.nft").write_text(rules["c"])
    (tmp_path / "connect.py").write_text(CONNECT)
    script = "; ".join([
        "set -e", "ip link set lo up",
        "ip tuntap add dev boot0 mode tap", "ip tuntap add dev data0 mode tap", "ip link set data0 mtu 9000",
        *(f"ip addr add {a}/24 dev boot0" for a in ("10.0.2.13", "10.0.2.12", "10.0.2.2", "10.0.2.99")),
        *(f"ip addr add {a}/24 dev data0" for a in ("10.10.0.13", "10.10.0.12", "10.10.0.99")),
        "ip link set boot0 up", "ip link set data0 up",
        f"nft -f {tmp_path / 'c.nft'}",
        f"{sys.executable} {tmp_path / 'connect.py'} 10.10.0.13 50100 10.10.0.12 10.0.2.2 10.10.0.99",
        f"{sys.executable} {tmp_path / 'connect.py'} 10.0.2.13 50101 10.0.2.12 10.0.2.99",
    ])
    proc = subprocess.run(["unshare", "--net", "--", "sh", "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-5:] == ["10.10.0.12 connected", "10.0.2.2 connected",
                                             "10.10.0.99 ConnectionRefusedError", "10.0.2.12 connected",
                                             "10.0.2.99 ConnectionRefusedError"]


def test_status_leaves_a_worker_on_a_data_network_it_is_not_on_unchecked(tmp_path: Path) -> None:
    """`cluster status` from a control node that is not on the data network (a namespace holding only loopback:
    nothing leaves it) says c's RPC worker is unchecked, with why, and does not count it as a problem: the gateway
    is what is down. On a machine that is on it, the worker is probed at its data address (the shared QEMU test)."""
    path = with_data(tmp_path, control={"address": "127.0.0.1", "http_port": 8000})
    with network_namespace() as ns, ns.inside():
        proc = run_cli("cluster", "status", str(path), "--json", env={"BUILDER_CACHE": str(tmp_path / "cache")})
    document = json.loads(proc.stdout)
    worker = next(p for s in document["services"] if s["name"] == "big" for p in s["processes"]
                  if p["role"] == "rpc-worker")
    assert worker == {"node": "c", "role": "rpc-worker", "address": "10.10.0.13:50100", "health": "unchecked",
                      "why": "on the data network 10.10.0.0/24, which this machine is not on"}
    assert proc.returncode == 1 and document["problems"] == ["the gateway is not running"] + [
        f"{s} server on {n} is unknown" for s, n in (("chat", "a"), ("chat", "b"), ("big", "b"))], document


def test_exports_put_workers_on_the_data_network_and_refuse_a_pipeline_there(tmp_path: Path) -> None:
    """The Kubernetes export probes c's RPC worker where it listens (its data address); a pipeline over the data
    network is one line (a LeaderWorkerSet's workers know only their node's primary address)."""
    out = tmp_path / "kube"
    proc = run_cli_inproc("cluster", "export", str(with_data(tmp_path)), "--format", "kube", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    worker = next(d for p in sorted(out.rglob("*.yaml")) for d in yaml.safe_load_all(p.read_text())
                  if d and d.get("kind") == "Deployment" and "rpc" in d["metadata"]["name"])
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][container["args"].index("--host") + 1] == "10.10.0.13", container["args"]
    assert container["readinessProbe"]["tcpSocket"]["host"] == "10.10.0.13", container
    err = run_cli_inproc("cluster", "export", str(pipeline_file(tmp_path / "p", y_data=True)), "--format", "kube",
                         "--out", str(tmp_path / "kube-p"))
    assert err.returncode == 2 and "the pipeline p joins over the data network" in err.stderr, err.stderr
