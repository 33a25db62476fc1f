"""`builder cluster drain` and `enable` against the real HAProxy builder configures, on loopback: stand-ins for
llama-server on node a (127.0.0.1) and node b (127.0.0.2) (tests/support/backends.py). The commands reach the
gateway through its runtime API, the socket file in the state folder `--local` uses for the cluster file."""

import concurrent.futures
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import LoopbackGateway, loopback_gateway, states, wait_for

from builder.cluster.gateway import reload_gateway
from builder.cluster.runtime import socket_path, worker_pid
from conftest import ROOT, free_port, require_tool, run_cli


@pytest.fixture
def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackGateway]:
    require_tool("haproxy", "haproxy")
    with loopback_gateway(tmp_path, free_port, monkeypatch) as gw:
        yield gw


def answered_by(gw: LoopbackGateway, count: int) -> list[str]:
    out = []
    for _ in range(count):
        resp = gw.ask()
        assert resp.status_code == 200, resp.text
        out.append(resp.json()["choices"][0]["message"]["content"].removeprefix("from "))
    return out


def test_drain_waits_for_the_requests_in_flight_and_sends_no_new_ones(gateway: LoopbackGateway) -> None:
    a, b = gateway.backends["a"], gateway.backends["b"]
    b.hold.set()
    a.hold.set()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        flying = [pool.submit(gateway.ask, 90) for _ in range(4)]
        wait_for("requests held on both nodes", lambda: a.held >= 1 and b.held >= 1 and a.held + b.held == 4)
        on_b = b.held
        a.hold.clear()
        a.release.set()  # a answers from now on
        drain = subprocess.Popen([sys.executable, "-m", "builder", "cluster", "drain", "--local", "--",
                                  str(gateway.cluster), "b"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        try:
            first = drain.stdout.readline()  # type: ignore[union-attr]
            assert first == f"b: {on_b} request(s) in flight, waiting\n"
            assert states(gateway)["b"] == "DRAIN"
            # while b finishes, new requests go to a only
            assert set(answered_by(gateway, 6)) == {"a"}
            assert drain.poll() is None, "drain returned while b still had requests in flight"
            b.release.set()
            out, err = drain.communicate(timeout=60)
        finally:
            if drain.poll() is None:
                drain.kill()
        assert drain.returncode == 0, err
        assert out.strip().splitlines()[-1] == "b drained (chat): no requests in flight"
        answers = [f.result() for f in flying]
    assert [r.status_code for r in answers] == [200] * 4  # the drained node's requests finished, none was cut
    assert b.answered == on_b
    assert states(gateway)["b"] == "DRAIN" and set(answered_by(gateway, 4)) == {"a"}

    done = run_cli("cluster", "enable", "--local", "--", str(gateway.cluster), "b")
    assert done.returncode == 0 and done.stdout == "b enabled (chat)\n", done.stderr
    assert states(gateway) == {"a": "UP", "b": "UP"}
    assert "b" in answered_by(gateway, 6)


def test_a_drain_that_outlasts_its_timeout_fails_and_leaves_the_node_drained(gateway: LoopbackGateway) -> None:
    b = gateway.backends["b"]
    b.hold.set()
    gateway.backends["a"].hang.set()  # so the request lands on b (a leaves the rotation)
    wait_for("a marked DOWN", lambda: states(gateway)["a"] == "DOWN")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        flying = pool.submit(gateway.ask, 90)
        wait_for("a request held on b", lambda: b.held == 1)
        done = run_cli("cluster", "drain", "--local", "--timeout", "1", "--", str(gateway.cluster), "b")
        assert done.returncode == 1
        assert done.stderr.splitlines()[0] == ("error: b still has 1 request(s) in flight after 1 s; it stays "
                                               "drained (no new requests)")
        assert states(gateway)["b"] == "DRAIN"
        b.release.set()
        assert flying.result().status_code == 200


@pytest.mark.parametrize("node", ["c", "../b", "b;x"])
def test_drain_of_a_node_not_in_the_file_is_refused(gateway: LoopbackGateway, node: str) -> None:
    done = run_cli("cluster", "drain", "--local", "--", str(gateway.cluster), node)
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == f"error: {gateway.cluster}: no node {node!r}"
    assert states(gateway) == {"a": "UP", "b": "UP"}


def test_drain_without_a_running_gateway_says_how_to_start_it(gateway: LoopbackGateway, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "tiny.gguf").write_bytes((gateway.cluster.parent / "tiny.gguf").read_bytes())
    (other / "cluster.yaml").write_text(gateway.cluster.read_text())
    done = run_cli("cluster", "drain", "--local", "--", str(other / "cluster.yaml"), "b")
    assert done.returncode == 1
    assert "the gateway's runtime API" in done.stderr and "builder cluster up" in done.stderr


def test_a_drained_node_stays_drained_across_a_reload(gateway: LoopbackGateway) -> None:
    done = run_cli("cluster", "drain", "--local", "--json", "--", str(gateway.cluster), "b")
    assert done.returncode == 0 and json.loads(done.stdout) == {"node": "b", "state": "drain", "services": ["chat"]}
    worker = worker_pid(socket_path(gateway.state))
    reload_gateway(gateway.state, gateway.state / "haproxy.pid")
    assert worker_pid(socket_path(gateway.state)) != worker  # a new worker, which read the saved states
    assert states(gateway) == {"a": "UP", "b": "DRAIN"}
    assert set(answered_by(gateway, 4)) == {"a"}
    done = run_cli("cluster", "enable", "--local", "--json", "--", str(gateway.cluster), "b")
    assert done.returncode == 0 and json.loads(done.stdout) == {"node": "b", "state": "ready", "services": ["chat"]}
    assert states(gateway) == {"a": "UP", "b": "UP"}
