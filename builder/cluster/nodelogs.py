"""`builder cluster logs FILE NODE [SERVICE]` for a netbooted node: its journal, read over HTTP.

A netbooted node runs systemd and keeps its journal in RAM, bounded (builder/netboot/nodeunits.py); the node's
systemd-journal-gatewayd serves it on the node's own address, port JOURNAL_PORT, which the node's firewall admits
from the control node only. builder asks for the entries of the node's own units (their journal identifiers,
NODE_IDENTIFIERS: setup, plan, DHCP, agent, ssh server, exporter, qualification, and systemd's own lines), or of
the units of SERVICE's processes on that node (`builder-SERVICE-ROLE`), the last N of them (`Range: entries=`),
as JSON, and prints each entry's message; with --follow it then asks for every entry after the last one shown
and keeps that request open (`follow`) until Ctrl-C.
Nothing the user types reaches the request but names checked against the cluster file and a number; every read
is bounded in time (but a follow's) and size.
"""

import http.client
import json
import re
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

from builder.cluster.model import Loaded
from builder.cluster.ssh import netbooted_address
from builder.core.errors import EngineError, RecipeError, Stopped
from builder.netboot.nodeunits import JOURNAL_PORT, NODE_IDENTIFIERS
from builder.recipe.load import display_path
from builder.recipe.targets import did_you_mean

MAX_LINES = 1_000_000
READ_SECONDS = 60  # one request without --follow, and a follow's connection
MAX_BYTES = 256 << 20  # what one request without --follow may return
MAX_ENTRY = 1 << 20  # one journal entry (a JSON line)
FOLLOW_ENTRIES = 1 << 62  # a follow's count of entries: no end
_CURSOR = re.compile(r"[A-Za-z0-9=;_-]{1,512}")


@dataclass(frozen=True)
class Request:
    node: str
    address: str
    identifiers: tuple[str, ...]  # journal identifiers (SYSLOG_IDENTIFIER) whose entries are read


def identifiers(loaded: Loaded, node: str, service: str | None) -> tuple[str, ...]:
    """The journal identifiers to read on `node`: its own units', or each process `service` runs there."""
    if service is None:
        return NODE_IDENTIFIERS
    where = display_path(loaded.path)
    names = [s.name for s in loaded.cluster.services]
    if service not in names:
        raise RecipeError(f"{where}: no service named {service!r}{did_you_mean(service, names)}",
                          f"services: {', '.join(names) or 'none'}")
    roles = [p.role for p in loaded.processes if p.node == node and p.service == service]
    if not roles:
        here = sorted({p.service for p in loaded.processes if p.node == node})
        raise RecipeError(f"{where}: service {service!r} runs nothing on {node}",
                          f"services on {node}: {', '.join(here) or 'none'} (leave SERVICE out for the node's own log)")
    return tuple(f"builder-{service}-{role}" for role in roles)  # its units' SyslogIdentifier (nodeunits.py)


def request(loaded: Loaded, node: str | None, service: str | None) -> Request:
    """What to read, checked: a netbooted node of the file with an address, and a service it runs."""
    where = display_path(loaded.path)
    names = [n.name for n in loaded.cluster.netbooted]
    if node is None:
        raise RecipeError("builder cluster logs: name the node to read (a netbooted node's logs are on the node)",
                          f"netbooted nodes: {', '.join(names) or 'none'}; e.g. builder cluster logs "
                          f"{where} {names[0] if names else 'NODE'}")
    address = netbooted_address(loaded, node, "builder cannot reach its journal")
    return Request(node, address, identifiers(loaded, node, service))


def path(req: Request, follow: bool) -> str:
    """The request's path: the entries of the identifiers (one match each: the journal ORs them), following."""
    query = urllib.parse.urlencode([("SYSLOG_IDENTIFIER", name) for name in req.identifiers])
    return f"/entries?{query}" + ("&follow" if follow else "")


def last_range(lines: int) -> str:
    """The Range header for the last `lines` entries. gatewayd seeks back from the end one entry further than asked
    (`-N` lands on the (N+1)-th last), so N+1 are asked for and the first of N+1 answers is left out."""
    if not 1 <= lines <= MAX_LINES:
        raise ValueError(f"lines: {lines} is not between 1 and {MAX_LINES}")
    return f"entries=:-{lines}:{lines + 1}"


def after_range(cursor: str | None) -> str:
    """The Range header of a follow: every entry after `cursor` (the last one shown), or every one."""
    if cursor is not None and not _CURSOR.fullmatch(cursor):
        raise ValueError("a journal cursor holds characters a cursor does not")
    return f"entries={cursor}:1:{FOLLOW_ENTRIES}" if cursor else f"entries=:0:{FOLLOW_ENTRIES}"


def entry(line: bytes) -> tuple[str, str] | None:
    """One entry (a JSON line) as its cursor and the line it printed; None for what is not an entry with both."""
    try:
        fields = json.loads(line)
    except ValueError:
        return None
    if not isinstance(fields, dict) or not isinstance(fields.get("__CURSOR"), str):
        return None
    text = fields.get("MESSAGE")
    if isinstance(text, list) and all(isinstance(b, int) and 0 <= b < 256 for b in text):
        text = bytes(text).decode("utf-8", "replace")  # a message that is not UTF-8 comes as its bytes
    return (fields["__CURSOR"], text.rstrip("\n")) if isinstance(text, str) else None


def _print(lines: list[str], out: IO[str] | None) -> None:
    out = out or sys.stdout
    out.write("".join(f"{line}\n" for line in lines))
    out.flush()


@contextmanager
def _entries(req: Request, range_: str, follow: bool) -> Iterator[Callable[[], bytes]]:
    """The node's answer to one request, line by line (a reader of one JSON line); following, without a time
    limit once it answers (the node sends nothing while nothing is logged)."""
    conn = http.client.HTTPConnection(req.address, JOURNAL_PORT, timeout=READ_SECONDS)
    try:
        conn.request("GET", path(req, follow), headers={"Accept": "application/json", "Range": range_})
        sock = conn.sock  # the response reads from it (http.client lets go of it for a response that ends the
        resp = conn.getresponse()  # connection)
        if resp.status != 200:
            raise EngineError(f"{req.node}: its journal at {req.address}:{JOURNAL_PORT} answered {resp.status} "
                              f"{resp.reason}", "the node's systemd-journal-gatewayd refused the request")
        if follow and sock is not None:
            sock.settimeout(None)
        yield lambda: resp.readline(MAX_ENTRY)
    except (OSError, http.client.HTTPException) as exc:
        raise EngineError(f"{req.node}: its journal at {req.address}:{JOURNAL_PORT} does not answer ({exc})",
                          "run this on the control node (the node's firewall admits its address only); a node that "
                          "boots a generation from before nodes ran systemd has no journal server: `builder pxe "
                          "publish`, then reboot it") from None
    finally:
        conn.close()


def read_logs(loaded: Loaded, node: str | None, service: str | None, lines: int, follow: bool,
              out: IO[str] | None = None) -> None:
    """Print the last `lines` entries of the node's units (or SERVICE's processes there); with `follow`, then every
    new one until the user stops builder (Ctrl-C)."""
    req = request(loaded, node, service)
    if lines == 0 and not follow:
        return
    shown: list[tuple[str, str]] = []
    size = 0
    try:
        with _entries(req, last_range(max(lines, 1)), False) as readline:
            while (line := readline()) and len(shown) <= lines + 1:
                size += len(line)
                if size > MAX_BYTES:
                    raise EngineError(f"{req.node}: more than {MAX_BYTES >> 20} MiB of journal for {lines} entries",
                                      "ask for fewer lines (-n)")
                if (found := entry(line)) is not None:
                    shown.append(found)
        shown = shown[-max(lines, 1):]  # with -n 0, the last entry only marks where the follow starts
        _print([text for _, text in shown] if lines else [], out)
        if not follow:
            return
        with _entries(req, after_range(shown[-1][0] if shown else None), True) as readline:
            while line := readline():
                if (found := entry(line)) is not None:
                    _print([found[1]], out)
    except (KeyboardInterrupt, Stopped):  # Ctrl-C or SIGTERM ends a follow: what the user asked for
        return
