"""The gateway's runtime API: HAProxy's stats socket at admin level, a socket file in the gateway's 0700 state
folder on the control node (never a TCP port).

What builder asks it: the running worker's pid (a reload is done when it changed), every server's state and
requests in flight, and to put a node's servers in `drain` (no new requests; those in flight finish; health
checks go on) or back to `ready`. One command per connection, as HAProxy's non-interactive mode answers.
"""

import csv
import io
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.core.errors import BuilderError

SOCKET_NAME = "admin.sock"
# sun_path holds 108 bytes with its terminating zero
MAX_SOCKET_PATH = 107
ANSWER_LIMIT = 1 << 22
TIMEOUT = 5.0


def socket_path(state: Path) -> Path:
    path = state / SOCKET_NAME
    if len(str(path).encode()) > MAX_SOCKET_PATH:
        raise BuilderError(f"{path}: the gateway's socket path is longer than {MAX_SOCKET_PATH} bytes",
                           "set BUILDER_CACHE to a shorter folder")
    return path


def command(sock: Path, line: str) -> str:
    """HAProxy's answer to one runtime API command."""
    if "\n" in line or ";" in line:
        raise ValueError(f"one command without separators: {line!r}")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(TIMEOUT)
            conn.connect(str(sock))
            conn.sendall(line.encode() + b"\n")
            out = b""
            while chunk := conn.recv(65536):
                out += chunk
                if len(out) > ANSWER_LIMIT:
                    raise BuilderError(f"{sock}: the gateway's answer to {line.split()[0]!r} is too long",
                                       "is this HAProxy's stats socket?")
    except PermissionError:
        raise BuilderError(f"the gateway's runtime API at {sock} is not yours to use (mode 0600)",
                           "run it as the user that started the gateway (root for `cluster up --install`)") from None
    except OSError as exc:
        raise BuilderError(f"the gateway's runtime API at {sock} did not answer ({exc.strerror or exc})",
                           "is the gateway up? `builder cluster up FILE` (it makes the socket)") from None
    return out.decode(errors="replace")


def worker_pid(sock: Path) -> int:
    """The pid of the worker that answers (a reload starts a new one)."""
    for row in command(sock, "show info").splitlines():
        if row.startswith("Pid:"):
            return int(row.split(":", 1)[1])
    raise BuilderError(f"{sock}: `show info` names no Pid", "is this HAProxy's stats socket?")


def serving(status: str, check: str) -> bool:
    """A server passes its health check (and its agent's): UP, or DRAIN when taken out of the rotation by hand.
    HAProxy counts a server UP before its first check; only a passed check (L7OK) says it serves."""
    return status in ("UP", "DRAIN") and check == "L7OK"


@dataclass(frozen=True)
class Server:
    backend: str
    node: str
    status: str  # UP, DOWN, DRAIN, MAINT, … (HAProxy's first word)
    active: int  # requests in flight
    queued: int
    check: str = ""  # the last health check: L7OK when /health answered 200, INI before the first
    total: int = 0  # requests sent so far
    why: str = ""  # what a netbooted node's agent said when it took the server out ("degraded: …")

    @property
    def serving(self) -> bool:
        return serving(self.status, self.check)


def parse_stats(text: str) -> list[Server]:
    """Every backend server in HAProxy's CSV stats (`show stat` here, `/stats;csv` on the stats port)."""
    out = []
    for row in csv.DictReader(io.StringIO(text.lstrip("# "))):
        if row.get("svname") in (None, "FRONTEND", "BACKEND") or row["pxname"] == "stats":
            continue
        # the agent's `down #REASON` reads "via agent : down (REASON)"
        agent = re.fullmatch(r"via agent : down \((.*)\)", row.get("last_agt") or "")
        why = agent.group(1) if agent and "(agent)" in (row["status"] or "") else ""
        out.append(Server(row["pxname"], row["svname"], (row["status"] or "?").split()[0], int(row["scur"] or 0),
                          int(row["qcur"] or 0), (row.get("check_status") or "").strip("* "),
                          int(row.get("stot") or 0), why))
    return out


def servers(sock: Path) -> list[Server]:
    """Every backend server of the gateway (`show stat`)."""
    return parse_stats(command(sock, "show stat"))


def node_servers(sock: Path, node: str) -> list[Server]:
    found = [s for s in servers(sock) if s.node == node]
    if not found:
        raise BuilderError(f"the gateway has no server on node {node!r}",
                           "name a node that runs a server (see `builder cluster status FILE`)")
    return found


def set_state(sock: Path, node: str, state: str) -> list[str]:
    """Every server on `node` to `state` (ready, drain or maint); the backends changed."""
    assert state in ("ready", "drain", "maint")
    changed = []
    for server in node_servers(sock, node):
        answer = command(sock, f"set server {server.backend}/{server.node} state {state}").strip()
        if answer:
            raise BuilderError(f"the gateway refused to set {server.backend}/{node} to {state}: {answer[:200]}",
                               "see `builder cluster status FILE`")
        changed.append(server.backend)
    return changed


def drain(sock: Path, node: str, timeout: float, say: Callable[[str], None]) -> None:
    """No new requests to `node`'s servers; returns once the requests in flight on them are done (an error
    after `timeout`, the node left drained)."""
    set_state(sock, node, "drain")
    deadline = time.monotonic() + timeout
    shown = -1
    while True:
        busy = sum(s.active + s.queued for s in node_servers(sock, node))
        if busy == 0:
            return
        if busy != shown:
            say(f"{node}: {busy} request(s) in flight, waiting")
            shown = busy
        if time.monotonic() > deadline:
            raise BuilderError(f"{node} still has {busy} request(s) in flight after {timeout:.0f} s; it stays "
                               "drained (no new requests)",
                               f"wait and run drain again, or `builder cluster enable FILE {node}` to put it back")
        time.sleep(0.5)
