"""`builder pxe publish` with a services-form cluster file, without booting: each node's plan (its servers and RPC
workers), its kernel command line, the models published by sha256, and bad input as one line."""

import hashlib
import json
from pathlib import Path

import pytest
import requests
import yaml
from test_netboot import fake_artifacts

from builder.cluster.plans import load_for_netboot, models, publish_services
from builder.core.errors import RecipeError
from builder.netboot.plan import AGENT_PORT
from builder.netboot.publish import current_id
from builder.netboot.serve import dnsmasq_config
from conftest import free_port, run_cli, run_cli_inproc

MACS = [f"52:54:00:12:34:{i:02x}" for i in range(1, 5)]
CHAT = b"GGUF chat model"
BIG = b"GGUF big model!!"


def cluster_file(tmp_path: Path, **changes: object) -> Path:
    """Three nodes: a (chat replica), b (chat replica and big's head), c (big's RPC worker, with a cache disk)."""
    (tmp_path / "chat.gguf").write_bytes(CHAT)
    (tmp_path / "big.gguf").write_bytes(BIG)
    data: dict[str, object] = {
        "control": {"address": "10.0.2.2", "http_port": 8000, "subnet": "10.0.2.0"},
        "cache": {"device": "PARTLABEL=builder-cache"},
        "nodes": [
            {"name": "a", "mac": MACS[0], "target": "cpu", "memory": "1GiB", "address": "10.0.2.11", "cache": False},
            {"name": "b", "mac": MACS[1], "target": "cpu", "memory": "1GiB", "address": "10.0.2.12"},
            {"name": "c", "mac": MACS[2], "target": "cpu", "memory": "1GiB", "address": "10.0.2.13",
             "cache": {"device": "/dev/disk/by-id/virtio-cache0"}},
        ],
        "services": [
            {"name": "chat", "model": "chat.gguf", "sha256": hashlib.sha256(CHAT).hexdigest(),
             "nodes": ["a", "b"], "context": 256, "args": ["--temp", "0", "--chat-template", "chatml  spaced"]},
            {"name": "big", "model": "big.gguf", "sha256": hashlib.sha256(BIG).hexdigest(), "topology": "split",
             "head": "b", "workers": ["c"], "port": 9000, "rpc_port": 50100},
        ],
    }
    data.update(changes)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def published(tmp_path: Path, path: Path, keep: int = 1) -> Path:
    root = tmp_path / "pxe-root"
    loaded = load_for_netboot(path)
    folder, manifest = fake_artifacts(tmp_path, f"s{len(list(tmp_path.glob('artifacts-*')))}")
    publish_services(root, loaded, models(loaded, print), {("cpu", "cpu"): (folder, manifest)}, keep)
    return root


def words(root: Path, mac: str) -> list[str]:
    return (root / "current" / "nodes" / f"{mac.replace(':', '-')}.ipxe").read_text().split()


def plan(root: Path, mac: str) -> list[list[str]]:
    """The node's plan as the node reads it: the blob its command line names, checked against its sha256."""
    line = words(root, mac)
    digest = next(w for w in line if w.startswith("builder.plan_sha256=")).split("=", 1)[1]
    assert f"builder.plan=http://10.0.2.2:8000/blobs/sha256/{digest}" in line
    data = (root / "blobs" / "sha256" / digest).read_bytes()
    assert hashlib.sha256(data).hexdigest() == digest
    assert data == (root / "current" / "nodes" / f"{mac.replace(':', '-')}.plan").read_bytes()
    return [row.split("\t") for row in data.decode().splitlines() if not row.startswith("#")]


def test_each_node_gets_a_plan_of_its_servers_and_workers(tmp_path: Path) -> None:
    root = published(tmp_path, cluster_file(tmp_path))
    chat, big = (hashlib.sha256(m).hexdigest() for m in (CHAT, BIG))
    base = "http://10.0.2.2:8000/blobs/sha256"
    args = ["--temp", "0", "--chat-template", "chatml  spaced"]  # an argument with spaces stays one argument
    # a node with a llama-server runs the gateway's agent (agent-check) on the plan's agent port
    assert plan(root, MACS[0]) == [["agent", "7999"],
                                   ["server", "chat", "8189", f"{base}/{chat}", chat, "-", "256", *args]]
    # a node may run several processes: a replica of chat and the head of big, with --rpc to its worker
    assert plan(root, MACS[1]) == [["agent", "7999"],
                                   ["server", "chat", "8189", f"{base}/{chat}", chat, "-", "256", *args],
                                   ["server", "big", "9000", f"{base}/{big}", big, "10.0.2.13:50100", "-"]]
    assert plan(root, MACS[2]) == [["rpc-worker", "big", "50100"]]
    # every model is a blob, fetched by sha256 from the control node
    assert (root / "blobs" / "sha256" / chat).read_bytes() == CHAT
    assert (root / "blobs" / "sha256" / big).read_bytes() == BIG

    a, b, c = (words(root, mac) for mac in MACS[:3])
    assert "builder.name=a" in a and not any(w.startswith(("builder.role=", "builder.cache=")) for w in a)
    assert f"builder.models={chat}:{len(CHAT)}" in a
    # the cluster's cache disk, or the node's own; the models to make room for on it
    assert "builder.cache=partlabel:builder-cache" in b
    assert f"builder.models={chat}:{len(CHAT)},{big}:{len(BIG)}" in b
    assert "builder.cache=id:virtio-cache0" in c and not any(w.startswith("builder.models=") for w in c)
    echo = (root / "current" / "nodes" / f"{MACS[1].replace(':', '-')}.ipxe").read_text().splitlines()[1]
    assert echo.startswith("echo builder: b (server chat, server big, cpu/cpu)")

    # each node's firewall as before: the cluster's addresses, its own ports in the comment
    digest = next(w for w in c if w.startswith("builder.firewall_sha256=")).split("=", 1)[1]
    rules = (root / "blobs" / "sha256" / digest).read_text()
    assert "elements = { 10.0.2.2, 10.0.2.11, 10.0.2.12, 10.0.2.13 }" in rules and "ports (50100)" in rules
    # a worker-only node runs no agent, only its journal's server; a server's node admits its agent port and its
    # journal's from the control node only
    assert "7999" not in rules and "tcp dport { 19531 } ip saddr 10.0.2.2 accept" in rules
    digest = next(w for w in b if w.startswith("builder.firewall_sha256=")).split("=", 1)[1]
    rules = (root / "blobs" / "sha256" / digest).read_text()
    agent = [line.strip() for line in rules.splitlines() if "dport { 7999, 19531 }" in line]
    assert agent == ["tcp dport { 7999, 19531 } ip saddr 10.0.2.2 accept",
                     "tcp dport { 7999, 19531 } reject with tcp reset"]
    assert rules.index("dport { 7999, 19531 } reject") < rules.index("saddr @cluster4 accept")
    nodes = json.loads((root / "current" / "nodes.json").read_text())
    assert nodes["b"]["processes"] == [{"service": "chat", "role": "server", "port": 8189},
                                       {"service": "big", "role": "server", "port": 9000}]
    # `pxe serve` reads the control node of either form from the generation
    assert "dhcp-range=10.0.2.0,proxy" in dnsmasq_config(root, load_for_netboot(cluster_file(tmp_path)).cluster
                                                         .control)  # type: ignore[arg-type]


def test_pruning_keeps_the_models_that_plans_name(tmp_path: Path) -> None:
    path = cluster_file(tmp_path)
    first = published(tmp_path, path, keep=0)
    data = yaml.safe_load(path.read_text())
    data["services"] = data["services"][:1]  # big is gone: its model with it
    path.write_text(yaml.safe_dump(data))
    root = published(tmp_path, path, keep=0)
    assert root == first and current_id(root)
    blobs = {p.name for p in (root / "blobs" / "sha256").iterdir()}
    assert hashlib.sha256(CHAT).hexdigest() in blobs and hashlib.sha256(BIG).hexdigest() not in blobs
    assert plan(root, MACS[2]) == []  # c serves nothing now: it boots and waits


def test_publish_through_the_cli_prints_each_nodes_processes(tmp_path: Path) -> None:
    path = cluster_file(tmp_path)
    (tmp_path / "sets").mkdir()
    folder, _ = fake_artifacts(tmp_path, "cli")
    folder.rename(tmp_path / "sets" / "cpu-cpu")
    proc = run_cli_inproc("pxe", "publish", str(path), "--root", str(tmp_path / "pxe-root"),
                   "--artifacts", str(tmp_path / "sets"))
    assert proc.returncode == 0, proc.stderr
    assert f"b            {MACS[1]}  server chat, server big  cpu" in proc.stdout
    assert f"c            {MACS[2]}  rpc-worker big  cpu" in proc.stdout


def _broken(tmp_path: Path, change: str) -> dict[str, object]:
    path = cluster_file(tmp_path)
    data: dict[str, object] = yaml.safe_load(path.read_text())
    nodes: list[dict[str, object]] = data["nodes"]  # type: ignore[assignment]
    services: list[dict[str, object]] = data["services"]  # type: ignore[assignment]
    if change == "no control":
        del data["control"]
    elif change == "not netbootable":
        nodes[0]["target"] = "nvidia"
    elif change == "no address":
        del nodes[2]["address"]
    elif change == "wrong sha256":
        services[0]["sha256"] = "0" * 64
    elif change == "not a gguf":
        (tmp_path / "notes.txt").write_text("secret")
        services[0]["model"] = "notes.txt"
    elif change == "empty arg":
        services[0]["args"] = ["--temp", ""]
    elif change == "bad cache":
        nodes[1]["cache"] = {"device": "/dev/sda1"}
    return data


@pytest.mark.parametrize(("change", "message"), [
    ("no control", "control: netbooted nodes fetch their boot files from the control node"),
    ("not netbootable", "nodes[0].target: nvidia cannot be netbooted yet"),
    ("no address", "nodes[2].address: c needs one: the head of big connects to its workers there"),
    ("wrong sha256", "services[0].sha256: chat.gguf has sha256 "),
    ("not a gguf", "services[0].model: notes.txt is not a GGUF file"),
    ("empty arg", "services[0].args[1]: an empty argument does not reach a netbooted node"),
    ("bad cache", "nodes[1].cache.Cache.device: Value error, must be PARTLABEL=NAME"),
])
def test_bad_services_file_is_one_line_and_exit_2(tmp_path: Path, change: str, message: str) -> None:
    path = tmp_path / "cluster.yaml"
    data = _broken(tmp_path, change)
    path.write_text(yaml.safe_dump(data))
    root = tmp_path / "pxe-root"
    proc = run_cli_inproc("pxe", "publish", str(path), "--root", str(root), "--artifacts", str(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not root.exists()  # nothing published, nothing built


def test_gateway_up_for_a_node_that_never_gets_healthy_is_one_line_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    """`cluster up` without --local starts HAProxy for real; a server nobody answers for (its node never booted)
    is one line naming service, node and address after --timeout, and the gateway it started is stopped."""
    (tmp_path / "chat.gguf").write_bytes(CHAT)
    gateway, metrics, dead = free_port(), free_port(), free_port()
    data = {"control": {"address": "10.0.2.2"},
            "gateway": {"address": "127.0.0.1", "port": gateway, "metrics_port": metrics},
            "nodes": [{"name": "a", "mac": MACS[0], "target": "cpu", "memory": "1GiB", "address": "127.0.0.1"}],
            "services": [{"name": "chat", "model": "chat.gguf", "sha256": hashlib.sha256(CHAT).hexdigest(),
                          "nodes": ["a"], "port": dead}]}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = run_cli("cluster", "up", str(path), "--timeout", "3", timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"chat on a (127.0.0.1:{dead}) is not healthy after 3 s (1 of 1 servers waiting)" in proc.stderr
    proc = run_cli("cluster", "status", str(path), "--json")
    status = json.loads(proc.stdout)
    assert status["gateway"]["running"] is False
    assert status["services"][0]["processes"][0]["health"] == "unknown"
    # not serving: exit 1, saying what is down, for scripts and monitoring
    assert proc.returncode == 1 and status["ok"] is False
    assert status["problems"] == ["the gateway is not running", "chat server on a is unknown"]
    text = run_cli("cluster", "status", str(path))
    assert text.returncode == 1 and text.stdout.splitlines()[-1] == (
        "state    NOT SERVING: the gateway is not running; chat server on a is unknown"), text.stdout
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{gateway}/v1/models", timeout=5)
    assert run_cli("cluster", "down", str(path)).stdout.strip() == "nothing was running"


def test_a_nodes_env_reaches_its_plan_and_a_credential_never_does(tmp_path: Path) -> None:
    """A node's `env` is in its plan, ahead of its processes (the node exports it for each of them); a name that
    holds a credential is refused for a netbooted node, even with unsafe_env: the boot network reads plans."""
    path = cluster_file(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["nodes"][0]["env"] = {"GGML_VK_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "4"}
    path.write_text(yaml.safe_dump(data))
    rows = plan(published(tmp_path, path), MACS[0])
    assert rows[:2] == [["env", "GGML_VK_VISIBLE_DEVICES", "0"], ["env", "OMP_NUM_THREADS", "4"]]
    assert [row[0] for row in rows[2:]] == ["agent", "server"]
    data["nodes"][1].update(env={"HF_TOKEN": "hf_x"}, unsafe_env=True)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError) as caught:
        load_for_netboot(path)
    assert "cluster.yaml: nodes[1].env.HF_TOKEN: looks like a credential" in str(caught.value)
    assert "boot network" in str(caught.value)


def test_a_service_on_the_agent_port_of_a_server_node_is_refused(tmp_path: Path) -> None:
    """A node with a llama-server runs the gateway's agent on AGENT_PORT: a service there cannot take that port
    (a worker-only node runs no agent, so its workers may)."""
    path = cluster_file(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["services"][1]["rpc_port"] = AGENT_PORT  # c runs big's worker only
    path.write_text(yaml.safe_dump(data))
    load_for_netboot(path)
    data["services"][1]["port"] = AGENT_PORT  # b runs big's head: a llama-server
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError) as caught:
        load_for_netboot(path)
    assert str(caught.value).endswith(f"cluster.yaml: services: a service on b uses port {AGENT_PORT}, where the "
                                      "node's gateway agent listens")
