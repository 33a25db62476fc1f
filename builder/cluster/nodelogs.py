"""`builder cluster logs FILE NODE [SERVICE]` for a netbooted node: its logs, read over ssh.

A netbooted node keeps, besides its console, a bounded log per process of its plan in RAM
(/run/builder/logs/SERVICE-ROLE.log, moved aside to `.1` at a size, images/netboot/plan.sh) and its own
`builder-node:` lines in node.log. builder logs in as `builder cluster reboot` does (builder/cluster/ssh.py:
the operator's key, the host key pinned through the node's agent) and runs a fixed command: `tail` of those
files. Nothing the user types reaches the remote shell but names checked here against the cluster file (a
service the file runs on that node) and a number. This is a pull over ssh until nodes run systemd and
systemd-journal-gatewayd.
"""

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from builder.cluster.model import Loaded
from builder.cluster.ssh import SSH_SECONDS, Say, Target, pin_host_key, ssh_argv, target
from builder.core.errors import CommandError, EngineError, RecipeError
from builder.core.preflight import require_tools
from builder.core.run import follow, run
from builder.recipe.load import display_path
from builder.recipe.targets import did_you_mean

LOG_DIR = "/run/builder/logs"  # plan.sh's LOG_DIR
NODE_LOG = "node"
MAX_LINES = 1_000_000
NO_LOG = 3  # the remote command's exit status when a log is not there
_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Request:
    target: Target
    logs: tuple[str, ...]  # file names under LOG_DIR without .log: "node", "SERVICE-ROLE"


def log_names(loaded: Loaded, node: str, service: str | None) -> tuple[str, ...]:
    """The logs to read on `node`: its node log, or each process `service` runs there (SERVICE-ROLE)."""
    if service is None:
        return (NODE_LOG,)
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
    return tuple(f"{service}-{role}" for role in roles)


def remote_command(logs: tuple[str, ...], lines: int, follow_: bool) -> str:
    """The fixed shell command run on the node: the last `lines` of each log (its rotated part first), or `tail -F`
    of them until the ssh session ends (the remote `cat` sees builder's end of stdin close, then stops tail)."""
    if not 0 <= lines <= MAX_LINES:
        raise ValueError(f"lines: {lines} is not between 0 and {MAX_LINES}")
    for name in logs:
        if not _FILE.fullmatch(name):
            raise ValueError(f"log name {name!r} holds characters a log name does not")
    files = [shlex.quote(f"{name}.log") for name in logs]
    check = f"cd {LOG_DIR} 2>/dev/null && ls -- {' '.join(files)} >/dev/null 2>&1 || exit {NO_LOG}"
    if follow_:
        return f"{check}; tail -n {lines} -F -- {' '.join(files)} & cat >/dev/null; kill $! 2>/dev/null; exit 0"
    parts = []
    for name, file in zip(logs, files, strict=True):
        header = f"echo {shlex.quote(f'==> {name} <==')}; " if len(logs) > 1 else ""
        parts.append(f"{header}cat -- {file}.1 {file} 2>/dev/null | tail -n {lines}")
    return f"{check}; " + "; ".join(parts)


def request(loaded: Loaded, node: str | None, service: str | None) -> Request:
    """What to read, checked: a netbooted node of the file (with admins:), and a service it runs."""
    where = display_path(loaded.path)
    if loaded.cluster.admins is None:
        raise RecipeError(f"{where}: no admins:, so builder cannot log in to the nodes to read their logs",
                          "add admins: with your SSH public key and address (docs/clusters.md), publish and reboot "
                          "the nodes; or read the node's serial console")
    if node is None:
        names = [n.name for n in loaded.cluster.netbooted]
        raise RecipeError("builder cluster logs: name the node to read (a netbooted node's logs are on the node)",
                          f"netbooted nodes: {', '.join(names) or 'none'}; e.g. builder cluster logs "
                          f"{where} {names[0] if names else 'NODE'}")
    t = target(loaded, node)
    return Request(t, log_names(loaded, node, service))


def _failed(req: Request, code: int, output: str) -> EngineError:
    t = req.target
    if code == NO_LOG:
        shown = ", ".join(f"{LOG_DIR}/{name}.log" for name in req.logs)
        return EngineError(f"{t.node}: no {shown} on the node",
                           "the node boots a generation from before nodes kept logs (`builder pxe publish`, then "
                           "reboot it), or the process has not started yet; its console has the output")
    last = next((line for line in reversed(output.strip().splitlines()) if line.strip()), f"exit code {code}")
    return EngineError(f"{t.node}: ssh root@{t.address} -p {t.port} failed: {last}",
                       "use a key listed in admins.keys (your ssh agent's, or --identity FILE), from an address in "
                       "admins.addresses; a changed host key is refused: if the node's cache disk was replaced, "
                       f"remove its line from {t.known_hosts}")


def read_logs(loaded: Loaded, node: str | None, service: str | None, lines: int, follow_: bool,
              identity: Path | None, say: Say) -> str | None:
    """The last `lines` of the node's log (or of SERVICE's processes there); with `follow_`, streamed to builder's
    own output until the session ends or builder is stopped (Ctrl-C), and None returned."""
    req = request(loaded, node, service)
    require_tools("builder cluster logs", ("ssh",))
    pin_host_key(req.target, say)
    argv = ssh_argv(req.target, remote_command(req.logs, lines, follow_), identity)
    if follow_:
        code = follow(argv)
        if code not in (0, None):
            raise _failed(req, code, "see the ssh error above")
        return None
    try:
        proc = run(argv, check=False, timeout=SSH_SECONDS)
    except CommandError as exc:
        raise _failed(req, -1, exc.message) from None
    if proc.returncode != 0:
        raise _failed(req, proc.returncode, proc.stderr or proc.stdout)
    return proc.stdout
