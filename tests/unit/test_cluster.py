"""Cluster files with services: every refusal is one line naming the file and field; the gateway's HAProxy config
is generated from the file and accepted by `haproxy -c`."""

import hashlib
import json
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.cluster.gateway import haproxy_config, models_document, write_gateway
from builder.cluster.model import load_cluster
from conftest import require_tool, run_cli_inproc

MODEL = b"GGUF" + bytes(1000)
SHA = hashlib.sha256(MODEL).hexdigest()


def node(name: str, last: int, memory: str = "4GiB", **extra: Any) -> dict[str, Any]:
    return {"name": name, "mac": f"52:54:00:12:34:{last:02x}", "target": "cpu", "memory": memory, **extra}


def service(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "model": "tiny.gguf", "sha256": SHA, **extra}


def cluster_file(tmp_path: Path, **changes: Any) -> Path:
    (tmp_path / "tiny.gguf").write_bytes(MODEL)
    data: dict[str, Any] = {
        "nodes": [node("a", 1), node("b", 2), node("c", 3), node("d", 4)],
        "services": [service("chat", nodes=["a", "b"])],
    }
    data.update(changes)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_replicate_and_split_place_servers_and_workers(tmp_path: Path) -> None:
    loaded = load_cluster(cluster_file(tmp_path, services=[
        service("chat", nodes=["a", "b"]),
        service("big", topology="split", head="c", workers=["d", "a"], memory="6GiB", port=9000),
    ]))
    placed = {(p.service, p.node, p.role, p.port) for p in loaded.processes}
    # chat's port comes from its name (8189): the same whatever services come before or after it
    assert placed == {("chat", "a", "server", 8189), ("chat", "b", "server", 8189),
                      ("big", "c", "server", 9000), ("big", "d", "rpc-worker", 50052),
                      ("big", "a", "rpc-worker", 50052)}
    assert loaded.warnings == ()


def test_more_than_two_workers_is_a_warning(tmp_path: Path) -> None:
    loaded = load_cluster(cluster_file(tmp_path, services=[
        service("big", topology="split", head="a", workers=["b", "c", "d"])]))
    assert len(loaded.warnings) == 1 and "services[0].workers: 3 RPC workers" in loaded.warnings[0]
    assert "deadlocks" in loaded.warnings[0]


def test_several_services_fit_a_node_that_holds_their_models(tmp_path: Path) -> None:
    loaded = load_cluster(cluster_file(tmp_path, nodes=[node("a", 1, "10GiB")], services=[
        service("one", nodes=["a"], memory="4GiB"), service("two", nodes=["a"], memory="6GiB")]))
    assert [(p.service, p.port) for p in loaded.processes] == [("one", 8537), ("two", 8742)]


def test_a_services_port_does_not_move_when_services_are_added_removed_or_reordered(tmp_path: Path) -> None:
    """Ports come from the service's name (or its own `port:`), not its place in the file: a firewall rule,
    a monitoring target or a bookmark for one service stays right when the file changes around it."""
    def ports(*names: str) -> dict[str, int]:
        path = cluster_file(tmp_path, nodes=[node("a", 1, "10GiB")],
                            services=[service(n, nodes=["a"], memory="1GiB") for n in names])
        return {p.service: p.port for p in load_cluster(path).processes}
    before = ports("one", "two")
    assert ports("zero", "two", "one") == {**before, "zero": ports("zero")["zero"]}
    assert ports("two") == {"two": before["two"]}
    assert all(8100 <= port < 9000 for port in before.values())


@pytest.mark.parametrize(("change", "message"), [
    ({"services": [service("chat", nodes=["a", "zz"])]}, "services[0].nodes[1]: no node named 'zz'"),
    ({"services": [service("chat", nodes=["a", "a"])]}, "services[0].nodes[1]: 'a' is listed twice"),
    ({"services": [service("chat")]}, "services[0].nodes: replicate needs at least one node"),
    ({"services": [service("chat", nodes=["a"], head="b")]}, "services[0]: head and workers belong to topology: split"),
    ({"services": [service("chat", topology="split")]}, "services[0].workers: split needs at least one"),
    ({"services": [service("chat", topology="split", head="a")]}, "services[0].workers: split needs at least one"),
    ({"services": [service("chat", topology="split", head="", workers=["b"])]},
     "services[0].head: String should have at least 1 character"),
    ({"services": [service("chat", topology="split", head="a", workers=["a"])]},
     "services[0].workers[0]: 'a' is already in this service"),
    ({"services": [service("chat", topology="split", head="a", nodes=["b"])]},
     "services[0].nodes: split takes head: and workers:"),
    ({"services": [service("x", topology="split", head="a", workers=["c"]),
                   service("y", topology="split", head="b", workers=["c"])]},
     "services[1].workers[0]: 'c' is already an RPC worker of 'x'"),
    ({"services": [service("x", nodes=["a"]), service("x", nodes=["b"])]}, "services[1].name: 'x' is already"),
    ({"services": [service("x", topology="pipeline", nodes=["a", "b"])]},
     "services[0].topology: pipeline is vLLM across nodes; llama.cpp spreads a GGUF with split"),
    ({"services": [service("x", engine="tgi", nodes=["a"])]}, "services[0].engine: Input should be"),
    ({"services": [service("bad name", nodes=["a"])]}, "services[0].name: String should match pattern"),
    ({"services": [service("x", nodes=["a"], sha256="abc")]}, "services[0].sha256: String should match"),
    ({"services": [service("x", nodes=["a"], model="missing.gguf")]}, "services[0].model: missing.gguf is not a file"),
    ({"services": [service("x", nodes=["a"], model="ftp://h/m.gguf")]}, "services[0].model: only http:// and https://"),
    ({"services": [service("x", nodes=["a"], model="hf://org/m")]},
     "services[0].model: 'hf://org/m' is not a Hugging Face model name"),
    ({"services": [service("x", nodes=["a"], sha256="")]},
     "services[0].sha256: a model given by path or URL needs its sha256"),
    ({"services": [service("x", nodes=["a"], model="http://10.0.0.1/m.gguf")]},
     "services[0].memory: a model given by URL needs its memory stated"),
    ({"nodes": [node("a", 1, "10GiB")], "services": [service("one", nodes=["a"], memory="6GiB"),
                                                     service("two", nodes=["a"], memory="6GiB")]},
     "nodes[0].memory: a has 10.0 GiB but its services need 12.0 GiB (one 6.0 GiB, two 6.0 GiB)"),
    ({"nodes": [{k: v for k, v in node("a", 1).items() if k != "memory"}, node("b", 2)]},
     "nodes[0].memory: a hosts chat but its memory is not declared"),
    ({"services": [service("one", nodes=["a"], port=9000), service("two", nodes=["a"], port=9000)]},
     "services[1].port: 9000 on node 'a' is already used by service 'one'"),
    ({"nodes": [node("a", 1), node("a", 2)]}, "nodes[1].name: 'a' is already nodes[0]"),
    ({"nodes": [node("a", 1), node("b", 1)]}, "nodes[1].mac: 52:54:00:12:34:01 is already nodes[0]"),
    ({"nodes": [node("a", 1, role="head")]}, "nodes[0].role: roles, ports and models come from services"),
    ({"nodes": [node("a", 1, vllm={"model": "m", "served_name": "m"})]},
     "nodes[0].vllm: roles, ports and models come from services"),
    ({"nodes": [node("a", 1, memory="lots")]}, "nodes[0].memory: could not parse value and unit"),
    ({"nodes": [node("a", 1, target="tpu")]}, "nodes[0]: target: unknown target 'tpu'"),
    ({"nodes": [node("a", 1, env={"X; rm": "1"}), node("b", 2)]},
     "nodes[0].env['X; rm'] (key): Value error, must be an environment variable name"),
    ({"nodes": [node("a", 1, env={"X": "1\n--privileged"}), node("b", 2)]}, "nodes[0].env.X: "),
    ({"services": []}, "services: List should have at least 1 item"),
    ({"gateway": {"port": 0}}, "gateway.port: Input should be greater than or equal to 1"),
    ({"gateway": {"max_request": "1KiB"}}, "gateway.max_request: Input should be greater than or equal to 16384"),
])
def test_bad_cluster_file_is_one_line_and_exit_2(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    proc = run_cli_inproc("cluster", "status", "--local", str(cluster_file(tmp_path, **change)))
    assert proc.returncode == 2, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("error: ") and "cluster.yaml: " in first and message in first, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 2


def test_netboot_only_form_is_read_as_services_with_a_note(tmp_path: Path) -> None:
    """Workers only (no head): a split without head, which --local has nothing to serve with."""
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"control": {"address": "10.0.2.2"},
                                    "nodes": [{"name": "n", "mac": "52:54:00:12:34:56", "target": "cpu",
                                               "role": "rpc-worker"}]}))
    proc = run_cli_inproc("cluster", "up", "--local", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"note: {path} uses the netboot-only form (nodes with role:); read as services: "
                                  f"`builder cluster convert {path}` prints it in the services form"), proc.stderr
    assert "services[0].head: rpc-workers is workers only (its head runs outside the file)" in proc.stderr


def test_without_local_the_gateway_needs_the_nodes_addresses_and_a_control_node(tmp_path: Path) -> None:
    """Without --local the gateway runs on the control node and reaches the netbooted nodes at their addresses:
    a missing one is one line before anything starts (tests/qemu/test_netboot_shared_qemu.py runs it for real)."""
    proc = run_cli_inproc("cluster", "up", str(cluster_file(tmp_path)))
    assert proc.returncode == 2 and "nodes[0].address: the gateway and the node's peers reach a there" \
        in proc.stderr and "Traceback" not in proc.stderr
    addressed = [node(n, i + 1, address=f"10.0.0.{11 + i}") for i, n in enumerate("abcd")]
    proc = run_cli_inproc("cluster", "status", str(cluster_file(tmp_path, nodes=addressed)))
    assert proc.returncode == 2 and "gateway.address: the gateway runs on the control node, and neither it nor " \
        "control: is declared" in proc.stderr
    wildcard = cluster_file(tmp_path, nodes=addressed, control={"address": "0.0.0.0"})
    proc = run_cli_inproc("cluster", "up", str(wildcard))
    assert proc.returncode == 2 and "control.address: 0.0.0.0 is every address" in proc.stderr
    proc = run_cli_inproc("cluster", "logs",
                          str(cluster_file(tmp_path, nodes=addressed, control={"address": "10.0.0.1"})))
    # a netbooted node's journal needs no admins: (no ssh), only the node to read
    assert proc.returncode == 2 and "name the node to read" in proc.stderr and "Traceback" not in proc.stderr


def test_without_local_a_gateway_address_or_port_this_machine_cannot_take_is_one_line(tmp_path: Path) -> None:
    """Checked by binding before HAProxy starts, so nothing is started and no health check leaves the machine
    (the nodes' 10.0.0.x addresses are never contacted)."""
    addressed = [node(n, i + 1, address=f"10.0.0.{11 + i}") for i, n in enumerate("abcd")]
    proc = run_cli_inproc("cluster", "up",
                          str(cluster_file(tmp_path, nodes=addressed, control={"address": "10.0.0.1"})))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "[ALERT]" not in proc.stderr
    assert "gateway.address: 10.0.0.1 is not an address of this machine" in proc.stderr, proc.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = cluster_file(tmp_path, nodes=addressed, control={"address": "10.0.0.1"},
                            gateway={"address": "127.0.0.1", "port": port})
        proc = run_cli_inproc("cluster", "up", str(path))
    assert proc.returncode == 2 and f"gateway.port: cannot listen on 127.0.0.1:{port}: Address already in use" \
        in proc.stderr, proc.stderr


def two_service_cluster(tmp_path: Path) -> Path:
    return cluster_file(tmp_path, services=[
        service("chat", nodes=["a", "b"]), service("big", topology="split", head="c", workers=["d"])])


def test_gateway_config_routes_each_model_to_its_servers(tmp_path: Path) -> None:
    loaded = load_cluster(two_service_cluster(tmp_path))
    addresses = {"a": "10.0.0.11", "b": "10.0.0.12", "c": "10.0.0.13", "d": "10.0.0.14"}
    config = haproxy_config(loaded, bind="192.168.1.2", addresses=addresses, state=tmp_path)
    assert "bind 192.168.1.2:8080" in config and "bind 127.0.0.1:8405" in config
    chat = config.split("\nbackend svc_chat", 1)[1].split("\nbackend ", 1)[0]
    assert "server a 10.0.0.11:8189 check" in chat and "server b 10.0.0.12:8189 check" in chat
    assert "balance leastconn" in chat and "option httpchk GET /health" in chat
    big = config.split("\nbackend svc_big", 1)[1]
    assert "server c 10.0.0.13:8193 check" in big and "10.0.0.14" not in big  # workers are not HTTP backends
    assert "use_backend svc_chat if { var(txn.model) -m str chat }" in config
    assert "retry-on conn-failure" in config and "option redispatch" in config
    assert "req.body,json_query('$.model')" in config
    assert f"map({tmp_path / 'api-key.map'})" in config  # the key is read from its file, never written here
    models = json.loads(models_document(loaded, 0))
    assert [m["id"] for m in models["data"]] == ["chat", "big"] and models["object"] == "list"


def test_generated_config_passes_haproxy_check(tmp_path: Path) -> None:
    require_tool("haproxy", "haproxy")
    loaded = load_cluster(two_service_cluster(tmp_path))
    state = tmp_path / "state"
    state.mkdir()
    config = write_gateway(loaded, state, "127.0.0.1", {n: f"127.0.0.{11 + i}" for i, n in enumerate("abcd")})
    proc = subprocess.run([shutil.which("haproxy") or "haproxy", "-c", "-f", str(config)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    key = (state / "api-key").read_text().strip()
    assert len(key) >= 40 and (state / "api-key").stat().st_mode & 0o777 == 0o600
    assert key not in config.read_text()
    # a second write keeps the key clients already have
    write_gateway(loaded, state, "127.0.0.1", {n: f"127.0.0.{11 + i}" for i, n in enumerate("abcd")})
    assert (state / "api-key").read_text().strip() == key


def test_max_request_sets_the_gateway_buffer(tmp_path: Path) -> None:
    require_tool("haproxy", "haproxy")
    loaded = load_cluster(cluster_file(tmp_path, gateway={"max_request": "64KiB"}))
    state = tmp_path / "state"
    state.mkdir()
    config = write_gateway(loaded, state, "127.0.0.1", {n: f"127.0.0.{11 + i}" for i, n in enumerate("abcd")})
    text = config.read_text()
    assert "tune.bufsize 65536" in text and "larger than the gateway buffer (65536 bytes)" in text
    default = haproxy_config(load_cluster(cluster_file(tmp_path)), bind="127.0.0.1", addresses={
        n: "127.0.0.1" for n in "abcd"}, state=state)
    assert "tune.bufsize 1048576" in default


def test_a_key_file_with_spaces_is_refused(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("two words\n")
    loaded = load_cluster(cluster_file(tmp_path, gateway={"key_file": "key"}))
    from builder.core.errors import RecipeError
    with pytest.raises(RecipeError, match="gateway.key_file: .* must hold one key without spaces"):
        write_gateway(loaded, tmp_path, "127.0.0.1", {n: "127.0.0.1" for n in "abcd"})


def test_a_key_file_other_users_can_read_is_refused(tmp_path: Path) -> None:
    from builder.core.errors import RecipeError
    key = tmp_path / "key"
    key.write_text("k3y\n")
    key.chmod(0o640)
    loaded = load_cluster(cluster_file(tmp_path, gateway={"key_file": "key"}))
    with pytest.raises(RecipeError, match=r"gateway.key_file: .*key can be read by other users \(mode 0640\)"):
        write_gateway(loaded, tmp_path, "127.0.0.1", {n: "127.0.0.1" for n in "abcd"})
    key.chmod(0o600)
    write_gateway(loaded, tmp_path, "127.0.0.1", {n: "127.0.0.1" for n in "abcd"})


def test_local_nodes_get_loopback_addresses_and_servers_their_alias(tmp_path: Path) -> None:
    from builder.cluster.local import Local, node_addresses, process_argv
    from builder.engines.podman import PodmanEngine

    loaded = load_cluster(two_service_cluster(tmp_path))
    assert node_addresses(loaded) == {"a": "127.0.0.11", "b": "127.0.0.12", "c": "127.0.0.13", "d": "127.0.0.14"}
    local = Local(loaded, tmp_path, "builder-cluster-0")
    argvs = {(p.service, p.node): process_argv(local, PodmanEngine(), p, "IMAGE", tmp_path / "tiny.gguf")
             for p in loaded.processes}
    chat = argvs[("chat", "b")]
    tail = chat[chat.index("IMAGE"):]
    assert tail[:2] == ["IMAGE", "server"] and "--metrics" in tail
    assert tail[tail.index("--alias") + 1] == "chat" and tail[tail.index("--host") + 1] == "127.0.0.12"
    assert f"{tmp_path / 'tiny.gguf'}:/models/chat.gguf:ro" in chat and "host" == chat[chat.index("--network") + 1]
    assert "--rm" not in chat  # kept after it exits, so `builder cluster logs` can show why
    head = argvs[("big", "c")]
    assert head[head.index("--rpc") + 1] == "127.0.0.14:50052"
    worker = argvs[("big", "d")]
    assert worker[worker.index("IMAGE"):] == ["IMAGE", "rpc-worker", "--host", "127.0.0.14", "--port", "50052"]
    assert worker[worker.index("--name") + 1] == "builder-cluster-0-d-big-rpc"


def test_every_cluster_file_field_is_documented() -> None:
    from builder.cluster.model import ClusterNode, Gateway, Service, ServiceCluster
    from builder.netboot.inventory import Control

    doc = (Path(__file__).resolve().parents[2] / "docs" / "clusters.md").read_text()
    missing = [f"{model.__name__}.{field}" for model in (ServiceCluster, Gateway, ClusterNode, Service, Control)
               for field in model.model_fields if f"`{field}`" not in doc and f"{field}:" not in doc]
    assert not missing, f"docs/clusters.md does not document: {missing}"
