"""`builder cluster roll` against the real HAProxy builder configures and a real pxe-root: two netbooted nodes a
(127.0.0.1) and b (127.0.0.2) serve `chat` through the gateway. Each node is a stand-in for llama-server
(tests/support/backends.py) that "reboots" when the roll's --reboot-command touches its flag file: it answers 503
for a few seconds, then boots the root image its boot files name (its pin, else the current generation, as
boot.ipxe chains them) and serves again, unless that image is one the test marked broken. No QEMU node runs
here: what the roll does to a real board (drain, pin, reboot command, health checks, enable) is the same."""

import hashlib
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from backends import LoopbackGateway, loopback_gateway, rebootable, states
from test_netboot import fake_artifacts, publish

from builder.cluster.model import load_cluster
from builder.cluster.roll import groups
from builder.netboot.publish import current_id, pins
from conftest import free_port, require_tool, run_cli

STEMS = {"a": "52-54-00-12-34-00", "b": "52-54-00-12-34-01"}


@dataclass
class Cluster:
    gw: LoopbackGateway
    root: Path
    flags: Path
    images: dict[str, str]  # generation seed -> its root image's sha256
    generations: dict[str, str]  # seed -> generation id
    broken: set[str]

    def roll(self, *args: str) -> "subprocess.CompletedProcess[str]":
        return run_cli("cluster", "roll", "--root", str(self.root), "--reboot-command",
                       f"touch {self.flags}/reboot-{{node}}", "--timeout", "20", *args, "--", str(self.gw.cluster),
                       timeout=240)


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    require_tool("haproxy", "haproxy")
    with loopback_gateway(tmp_path, free_port, monkeypatch, netboot=True) as gw:
        root, flags = tmp_path / "pxe-root", tmp_path / "flags"
        flags.mkdir()
        images, ids = {}, {}
        for seed in ("old", "new"):
            folder, manifest = fake_artifacts(tmp_path, seed)
            ids[seed], _ = publish(root, gw.cluster, {("cpu", "cpu"): (folder, manifest)})
            images[seed] = manifest["files"]["root.squashfs"]["sha256"]  # type: ignore[index]
            if seed == "old":  # the nodes booted the old generation, then `new` was published
                broken: set[str] = set()
                for node, backend in gw.backends.items():
                    rebootable(backend, flags / f"reboot-{node}", root, STEMS[node], broken)
        yield Cluster(gw, root, flags, images, ids, broken)


@dataclass
class Load:
    """A bounded loop of requests through the gateway while the roll runs, each with the servers' states seen
    just after it was answered."""

    gw: LoopbackGateway
    stop: threading.Event
    answers: list[tuple[int, str, dict[str, str]]]

    def run(self) -> None:
        deadline = time.monotonic() + 200
        with requests.Session() as session:
            for _ in range(5000):
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    resp = session.post(f"{self.gw.url}/v1/chat/completions", headers=self.gw.headers(), timeout=30,
                                        json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
                    who = resp.json()["choices"][0]["message"]["content"] if resp.status_code == 200 else resp.text
                    self.answers.append((resp.status_code, who, states(self.gw)))
                except requests.RequestException as exc:
                    self.answers.append((0, type(exc).__name__, states(self.gw)))
                time.sleep(0.05)


def test_a_two_replica_roll_loses_no_request(cluster: Cluster) -> None:
    load = Load(cluster.gw, threading.Event(), [])
    thread = threading.Thread(target=load.run)
    thread.start()
    try:
        done = cluster.roll("--canary", "b")
    finally:
        load.stop.set()
        thread.join(60)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"== b: generation {cluster.generations['old']} -> {cluster.generations['new']}"
    assert lines[-1] == f"every node runs generation {cluster.generations['new']}: it is current, the pins are cleared"
    for node, backend in cluster.gw.backends.items():
        assert backend.booted == [cluster.images["old"], cluster.images["new"]], node
    assert current_id(cluster.root) == cluster.generations["new"] and pins(cluster.root) == {}
    assert states(cluster.gw) == {"a": "UP", "b": "UP"}
    failed = [a for a in load.answers if a[0] != 200]
    assert failed == [] and len(load.answers) > 20
    # requests were answered while a node was out of the rotation, and one replica served at every sample
    assert any(seen != {"a": "UP", "b": "UP"} for _, _, seen in load.answers)
    assert all("UP" in seen.values() for _, _, seen in load.answers)


def test_a_failed_roll_puts_the_node_back_and_stops(cluster: Cluster) -> None:
    cluster.broken.add(cluster.images["new"])  # the new generation's server never becomes healthy
    done = cluster.roll("--canary", "b")
    assert done.returncode == 1, done.stdout + done.stderr
    old, new = cluster.generations["old"], cluster.generations["new"]
    error = done.stderr.splitlines()[0]
    assert error.startswith("error: the roll stopped at b: b did not serve within 20 s of its reboot")
    assert "b is back on its previous generation and serving" in error
    a, b = cluster.gw.backends["a"], cluster.gw.backends["b"]
    assert b.booted == [cluster.images["old"], cluster.images["new"], cluster.images["old"]]
    assert a.booted == [cluster.images["old"]]  # the roll stopped before a
    assert pins(cluster.root) == {STEMS["a"]: old, STEMS["b"]: old}
    assert states(cluster.gw) == {"a": "UP", "b": "UP"}
    resp = cluster.gw.ask()
    assert resp.status_code == 200
    # rolling again once the generation is fixed goes on from there: the pins say where each node is
    assert current_id(cluster.root) == new


def test_a_roll_needs_a_way_to_reboot_and_a_known_canary(cluster: Cluster) -> None:
    args = ("cluster", "roll", "--root", str(cluster.root))
    done = run_cli(*args, "--", str(cluster.gw.cluster))
    assert done.returncode == 2 and "pass --reboot-command" in done.stderr
    done = run_cli(*args, "--reboot-command", "true", "--", str(cluster.gw.cluster))
    assert done.returncode == 2 and done.stderr.startswith("error: --reboot-command: must name the node as {node}")
    done = run_cli(*args, "--canary", "z", "--reboot-command", "touch {node}", "--", str(cluster.gw.cluster))
    assert done.returncode == 2 and done.stderr.startswith(f"error: {cluster.gw.cluster}: no netbooted node 'z'")
    assert pins(cluster.root) == {} and all(len(b.booted) == 1 for b in cluster.gw.backends.values())


def test_a_split_service_moves_its_head_and_workers_together(tmp_path: Path) -> None:
    model = b"GGUF" + bytes(100)
    (tmp_path / "m.gguf").write_bytes(model)
    sha = hashlib.sha256(model).hexdigest()
    nodes = [{"name": f"n{i}", "mac": f"52:54:00:00:00:0{i}", "target": "cpu", "memory": "8GiB",
              "address": f"10.0.0.{i}"} for i in range(1, 6)]
    services = [{"name": "big", "model": "m.gguf", "sha256": sha, "topology": "split", "head": "n3",
                 "workers": ["n1"]},
                {"name": "chat", "model": "m.gguf", "sha256": sha, "nodes": ["n2", "n4", "n5"]}]
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({"control": {"address": "10.0.0.100"}, "nodes": nodes,
                                                           "services": services}))
    loaded = load_cluster(tmp_path / "cluster.yaml")
    assert groups(loaded) == [["n1", "n3"], ["n2"], ["n4"], ["n5"]]
    assert groups(loaded, canary="n4") == [["n4"], ["n1", "n3"], ["n2"], ["n5"]]
    assert groups(loaded, canary="n3")[0] == ["n1", "n3"]
