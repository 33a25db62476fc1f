"""A backend that hangs, and a gateway reload, with the real HAProxy on loopback: stand-ins for llama-server
(tests/support/backends.py) on 127.0.0.1 (node a) and 127.0.0.2 (node b) behind the config builder writes.

A server that accepts connections and answers nothing must leave the rotation within its health checks, and the
requests already on it must end well before the gateway's server timeout (10 minutes): answered by the healthy
server when no byte had come back (HAProxy retries them), else an OpenAI-style JSON error."""

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import LoopbackGateway, loopback_gateway, states, wait_for

from builder.cluster.gateway import gateway_pid, read_stats, reload_gateway
from builder.cluster.runtime import socket_path, worker_pid
from conftest import free_port, require_tool


@pytest.fixture
def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackGateway]:
    require_tool("haproxy", "haproxy")
    with loopback_gateway(tmp_path, free_port, monkeypatch) as gw:
        yield gw


def test_a_hung_backend_leaves_the_rotation_and_its_requests_end_quickly(gateway: LoopbackGateway) -> None:
    hung = gateway.backends["b"]
    hung.hang.set()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        # a client timeout far below the gateway's 10-minute server timeout: a request left waiting on the hung
        # server until then would raise here
        answers = list(pool.map(lambda _: gateway.ask(timeout=90), range(8)))
    assert hung.received >= 1, "no request reached the hung server: the test proves nothing"
    for resp in answers:
        body = resp.json()
        if resp.status_code == 200:
            assert body["choices"][0]["message"]["content"] == "from a"
        else:
            assert resp.status_code in (502, 503, 504) and body["error"]["type"] == "server_error", resp.text
    wait_for("b marked DOWN", lambda: states(gateway)["b"] == "DOWN")
    # what `builder cluster status` shows as its last check: a check that got no answer in time
    assert {s.node: s.last_check for s in read_stats(gateway.metrics_port)}["b"] == "L7TOUT"
    # and new requests go to the healthy one only
    resp = gateway.ask()
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "from a"


def test_with_every_server_hung_the_client_gets_an_openai_error_not_a_wait(gateway: LoopbackGateway) -> None:
    for backend in gateway.backends.values():
        backend.hang.set()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: gateway.ask(timeout=90), range(2)))
    assert sum(b.received for b in gateway.backends.values()) >= 1
    for resp in answers:
        assert resp.status_code == 503, resp.text
        assert resp.headers["Content-Type"] == "application/json"
        error = resp.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "service_unavailable" and error["message"]
    assert states(gateway) == {"a": "DOWN", "b": "DOWN"}


def test_a_reload_finishes_the_requests_in_flight(gateway: LoopbackGateway) -> None:
    pidfile = gateway.state / "haproxy.pid"
    master, worker = gateway_pid(pidfile), worker_pid(socket_path(gateway.state))
    for backend in gateway.backends.values():
        backend.hold.set()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        flying = [pool.submit(gateway.ask, 90) for _ in range(4)]
        wait_for("4 requests held by the servers", lambda: sum(b.held for b in gateway.backends.values()) == 4)
        reload_gateway(gateway.state, pidfile)
        assert gateway_pid(pidfile) == master and worker_pid(socket_path(gateway.state)) != worker
        # the new worker serves while the old one still holds the four
        gateway.backends["a"].hold.clear()
        gateway.backends["b"].hold.clear()
        fresh = gateway.ask()
        assert fresh.status_code == 200, fresh.text
        for backend in gateway.backends.values():
            backend.release.set()
        answers = [f.result() for f in flying]
    assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
    assert all(r.json()["object"] == "chat.completion" for r in answers)
