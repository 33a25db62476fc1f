"""A netbooted node's ready check (images/netboot/plan.sh's is_ready, run by bash as the node runs it) against
real servers on loopback: a server is ready when its /health answers 200; one that answers 503 (loading) is not;
one that accepts the connection and never answers is not either, and the check gives up on it (bounded, 10 s)
instead of holding its unit's start forever (the unit's start has no timeout: vLLM may load for hours)."""

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from conftest import ROOT
from servers import LoopbackListener

PLAN_SH = ROOT / "images" / "netboot" / "plan.sh"


@contextmanager
def server(answer: bytes | None) -> Iterator[int]:
    """A loopback listener that reads a request and sends `answer`, or with None holds every connection open and
    silent until the test ends; yields its port."""
    held: list[socket.socket] = []

    def handle(conn: socket.socket) -> None:
        if answer is None:
            held.append(conn)
            return
        with conn:
            conn.settimeout(5)
            conn.recv(4096)
            conn.sendall(answer)

    listener = LoopbackListener(handle)
    try:
        yield listener.port
    finally:
        listener.close()
        for conn in held:
            conn.close()


def is_ready(port: int) -> int:
    """The exit status of `is_ready server PORT` on a node whose address is 127.0.0.1."""
    return subprocess.run(["bash", "-c", '. "$1"; NODE_IP=127.0.0.1; is_ready server "$2"', "node", str(PLAN_SH),
                           str(port)], env={"PATH": "/usr/bin:/bin", "NODE_STATE_DIR": "/nonexistent"},
                          capture_output=True, timeout=60).returncode


@pytest.mark.parametrize(("answer", "ready"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}", True),
    (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", False),
], ids=["answers 200", "still loading"])
def test_a_server_is_ready_when_its_health_answers_200(answer: bytes, ready: bool) -> None:
    with server(answer) as port:
        assert (is_ready(port) == 0) is ready


def test_a_server_that_accepts_and_never_answers_is_not_ready_and_the_check_returns() -> None:
    """Without its bound the check would wait here forever (the subprocess timeout of 60 s would fail the test)."""
    with server(None) as port:
        assert is_ready(port) != 0
