"""`builder cluster logs FILE NODE [SERVICE]` without --local: what is checked before any request (the node, the
service on that node), the one request made (the journal identifiers of the node's own units or of the service's
units there, the last N entries), and what is printed, against a stand-in for the node's systemd-journal-gatewayd
on loopback that records the request and answers as gatewayd does (no node in a unit test;
tests/qemu/test_netboot_shared_qemu.py reads a booted node's journal)."""

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_cluster_firewall import services_file

from builder.cluster import nodelogs
from builder.cluster.model import load_cluster
from builder.cluster.nodelogs import after_range, entry, identifiers, last_range
from builder.netboot.nodeunits import NODE_IDENTIFIERS
from conftest import free_port, run_cli_inproc


def test_each_process_of_the_service_on_that_node_has_its_identifier(tmp_path: Path) -> None:
    loaded = load_cluster(services_file(tmp_path))
    assert identifiers(loaded, "a", None) == NODE_IDENTIFIERS
    assert identifiers(loaded, "a", "chat") == ("builder-chat-server",)
    assert identifiers(loaded, "a", "big") == ("builder-big-server",)
    assert identifiers(loaded, "b", "big") == ("builder-big-rpc-worker",)


def test_the_range_is_the_last_entries_and_a_number_only() -> None:
    assert last_range(50) == "entries=:-50:51"  # gatewayd lands one further back: the first of 51 is left out
    assert after_range(None) == f"entries=:0:{1 << 62}"
    assert after_range("s=ab12;i=3f;b=cd") == f"entries=s=ab12;i=3f;b=cd:1:{1 << 62}"
    for lines in (0, -1, 10**7):
        with pytest.raises(ValueError):
            last_range(lines)
    with pytest.raises(ValueError):
        after_range("x\r\nHost: elsewhere")


def test_an_entry_prints_its_message() -> None:
    assert entry(b'{"__CURSOR": "c1", "MESSAGE": "builder-node: ready", "_PID": "1"}') == ("c1", "builder-node: ready")
    raw = json.dumps({"__CURSOR": "c", "MESSAGE": list(b"caf\xc3\xa9 \xff")}).encode()  # not UTF-8: its bytes
    assert entry(raw) == ("c", "caf\u00e9 \ufffd")
    assert entry(b'{"__CURSOR": "c", "_PID": "1"}') is None and entry(b'{"MESSAGE": "x"}') is None
    assert entry(b"not json") is None and entry(b"[1]") is None


@pytest.mark.parametrize(("words", "text"), [
    ((), "name the node to read"),
    (("zz",), "no netbooted node named 'zz'"),
    (("a", "chatt"), "no service named 'chatt' (did you mean 'chat'?)"),
    (("b", "chat"), "service 'chat' runs nothing on b"),
    (("a", "chat", "-n", "-1"), "--lines' / '-n': Input should be greater than or equal to 0"),
])
def test_a_wrong_node_or_service_is_one_line_before_any_request(tmp_path: Path, words: tuple[str, ...],
                                                                text: str) -> None:
    proc = run_cli_inproc("cluster", "logs", str(services_file(tmp_path)), *words)
    assert proc.returncode == 2 and text in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


class Gatewayd(BaseHTTPRequestHandler):
    """Answers /entries as systemd-journal-gatewayd does with Accept: application/json (one entry per line) for a
    journal of three entries: `entries=:-N:M` from the (N+1)-th last entry, at most M; `CURSOR:1:M` after it."""

    seen: list[tuple[str, str | None, str | None]] = []
    status = 200
    journal = ("srv  line zero", "srv  line one", "srv  line two")

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        Gatewayd.seen.append((self.path, self.headers.get("Range"), self.headers.get("Accept")))
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        cursor, skip, count = (self.headers.get("Range") or "entries=:0:99").removeprefix("entries=").split(":")
        first = int(cursor[1:]) + 1 if cursor else max(0, len(self.journal) + int(skip) - 1) if int(skip) < 0 else 0
        for i in range(first, min(len(self.journal), first + int(count))):
            line = {"__CURSOR": f"c{i}", "MESSAGE": self.journal[i], "SYSLOG_IDENTIFIER": "builder-chat-server"}
            self.wfile.write(json.dumps(line).encode() + b"\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def gatewayd(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    port = free_port()
    monkeypatch.setattr(nodelogs, "JOURNAL_PORT", port)
    server = ThreadingHTTPServer(("127.0.0.1", port), Gatewayd)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Gatewayd.seen, Gatewayd.status = [], 200
    yield port
    server.shutdown()
    server.server_close()


def loopback_file(tmp_path: Path) -> Path:
    nodes = [{"name": "a", "mac": "52:54:00:00:04:01", "target": "cpu", "memory": "8GiB", "address": "127.0.0.1"}]
    services = [{"name": "chat", "model": "http://10.0.0.1/m.gguf", "sha256": "0" * 64, "memory": "1GiB",
                 "nodes": ["a"], "port": 9000}]
    return services_file(tmp_path, nodes=nodes, services=services)


def test_it_asks_the_nodes_journal_and_prints_the_messages(tmp_path: Path, gatewayd: int) -> None:
    path = loopback_file(tmp_path)
    proc = run_cli_inproc("cluster", "logs", str(path), "a", "chat", "-n", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "srv  line one\nsrv  line two\n"
    assert Gatewayd.seen == [("/entries?SYSLOG_IDENTIFIER=builder-chat-server", "entries=:-2:3", "application/json")]
    node = run_cli_inproc("cluster", "logs", str(path), "a")  # fewer entries than asked for: all of them
    assert node.returncode == 0 and node.stdout == "srv  line zero\nsrv  line one\nsrv  line two\n", node.stderr
    query = "&".join(f"SYSLOG_IDENTIFIER={name}" for name in NODE_IDENTIFIERS)
    assert Gatewayd.seen[-1] == (f"/entries?{query}", "entries=:-50:51", "application/json")
    follow = run_cli_inproc("cluster", "logs", str(path), "a", "chat", "-f", "-n", "1")
    # the last entry, then a follow after its cursor (the stand-in has nothing newer and ends its answer)
    assert follow.returncode == 0 and follow.stdout == "srv  line two\n", follow.stderr
    assert Gatewayd.seen[-1][:2] == ("/entries?SYSLOG_IDENTIFIER=builder-chat-server&follow", f"entries=c2:1:{1 << 62}")


def test_a_node_that_does_not_answer_is_one_line(tmp_path: Path, gatewayd: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = loopback_file(tmp_path)
    Gatewayd.status = 404
    refused = run_cli_inproc("cluster", "logs", str(path), "a")
    assert refused.returncode == 1 and "a: its journal at 127.0.0.1:" in refused.stderr, refused.stderr
    assert "answered 404" in refused.stderr and "Traceback" not in refused.stderr
    monkeypatch.setattr(nodelogs, "JOURNAL_PORT", free_port())  # nothing listens there
    gone = run_cli_inproc("cluster", "logs", str(path), "a")
    assert gone.returncode == 1 and "does not answer" in gone.stderr and "Traceback" not in gone.stderr, gone.stderr
    assert "control node" in gone.stderr
