"""Getting into a netbooted node: its ssh host key (as its gateway agent reports it) and `builder cluster reboot`.

The node makes its host key itself (images/netboot/sshd.sh) and prints its fingerprint on its console; the
control node never holds a node's private key. The node's agent (plan.py's AGENT_PORT, which its firewall
admits from the control node only) answers `ssh` with the public key, so `cluster status` shows the
fingerprint and `cluster reboot` pins it on first contact in a known_hosts file of builder's own for the
cluster; from then on a changed key is refused. A node without a cache disk makes a new host key at every boot
(it has nowhere to keep one): for it, builder pins again what its agent reports, and says so. ssh runs as the
operator's own client, with their agent or the key given by --identity; its options come from builder only (no
password, no prompt, the pinned host key).
"""

import base64
import hashlib
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.cluster.admins import check_key
from builder.cluster.model import Loaded
from builder.core.errors import CommandError, EngineError, RecipeError
from builder.core.files import write_atomically
from builder.core.preflight import require_tools
from builder.core.run import run
from builder.netboot.plan import AGENT_PORT
from builder.recipe.load import display_path
from builder.recipe.targets import did_you_mean

Say = Callable[[str], None]
AGENT_SECONDS = 3
SSH_SECONDS = 60
REBOOT = "/usr/lib/builder/reboot"  # images/netboot/reboot.sh on the node


def fingerprint(key: str) -> str:
    """`SHA256:…` of a public key line `TYPE BASE64`, as ssh-keygen -l prints it."""
    digest = hashlib.sha256(base64.b64decode(key.split(" ")[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def ask_agent(address: str, word: str, seconds: float = AGENT_SECONDS) -> str | None:
    """The node agent's one-line answer to `word` (ASCII, at most 16 KiB); None without one."""
    try:
        with socket.create_connection((address, AGENT_PORT), timeout=seconds) as conn:
            conn.sendall(f"{word}\n".encode())
            answer = b""
            while len(answer) < 16384 and (chunk := conn.recv(4096)):
                answer += chunk
        return answer.decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def host_key(address: str) -> str | None:
    """The node's ssh host key (`TYPE BASE64`) as its agent reports it; None without an answer or a key."""
    answer = ask_agent(address, "ssh")
    try:
        return check_key(answer) if answer else None
    except ValueError:
        return None


_UNIT = re.compile(r"(builder-[A-Za-z0-9@._-]+|systemd-journal-gatewayd\.socket)=([a-z-]+)/([a-z-]+)")


def node_units(address: str) -> dict[str, str] | None:
    """The state of each unit the node's plan started (`ACTIVE/SUB`, e.g. `active/running`, `failed/failed`,
    `activating/auto-restart`), as its agent reports them; None without an answer."""
    answer = ask_agent(address, "units", seconds=10)  # the node runs `systemctl show` for it
    if answer is None or answer == "none":
        return None
    return {m.group(1): f"{m.group(2)}/{m.group(3)}" for word in answer.split() if (m := _UNIT.fullmatch(word))}


def host_keys(loaded: Loaded) -> dict[str, str]:
    """Each netbooted node's host-key fingerprint its agent reports (nodes with an agent, with admins:)."""
    if loaded.cluster.admins is None:
        return {}
    out = {}
    for name in sorted(loaded.agent_hosts()):
        address = loaded.node(name).address
        key = host_key(address) if address else None
        if key:
            out[name] = fingerprint(key)
    return out


@dataclass(frozen=True)
class Target:
    node: str
    address: str
    port: int
    known_hosts: Path
    keeps_key: bool = True  # the node keeps its host key on its cache disk across boots


def target(loaded: Loaded, name: str) -> Target:
    """The node to reach over ssh, checked: a netbooted node with an address, in a file with admins:."""
    where = display_path(loaded.path)
    admins = loaded.cluster.admins
    if admins is None:
        raise RecipeError(f"{where}: admins: none, so the nodes run no ssh server",
                          "add admins: with your SSH public key and address (docs/clusters.md), then "
                          "`builder pxe publish` and reboot the nodes once by hand")
    address = netbooted_address(loaded, name, "ssh cannot find it")
    _, state = loaded.state_folder("ssh-")
    keeps_key = loaded.cluster.cache_of(loaded.node(name)) is not None
    return Target(name, address, admins.ssh_port, state / "known_hosts", keeps_key)


def netbooted_address(loaded: Loaded, name: str, without: str) -> str:
    """The address of the netbooted node `name`, checked: one line naming the file's netbooted nodes for a name
    that is not one, or saying what cannot happen (`without`) for a node with no address."""
    where = display_path(loaded.path)
    names = [n.name for n in loaded.cluster.netbooted]
    if name not in names:
        raise RecipeError(f"{where}: no netbooted node named {name!r}{did_you_mean(name, names)}",
                          f"netbooted nodes: {', '.join(names) or 'none'}")
    address = loaded.node(name).address
    if not address:
        raise RecipeError(f"{where}: {name}: no address: in the file, so {without}",
                          "reserve an address for the node in your DHCP server and write it here")
    return str(address)


def _host(t: Target) -> str:
    return t.address if t.port == 22 else f"[{t.address}]:{t.port}"


def pin_host_key(t: Target, say: Say) -> None:
    """On first contact, write the node's host key (from its agent) into builder's known_hosts for the cluster;
    for a node without a cache disk (a new key every boot), again whenever its agent reports another one."""
    known = t.known_hosts.read_text().splitlines() if t.known_hosts.is_file() else []
    pinned = [line for line in known if line.split(" ")[0] == _host(t)]
    if pinned and t.keeps_key:
        return
    key = host_key(t.address)
    if key is None:
        raise EngineError(f"{t.node}: its agent on {t.address}:{AGENT_PORT} reports no ssh host key, so its "
                          f"{'key' if pinned else 'first contact'} cannot be checked",
                          "check that the node booted a generation with admins: (its console prints "
                          "`ssh host key SHA256:…`), then try again")
    if pinned and pinned[0] == f"{_host(t)} {key}":
        return
    t.known_hosts.parent.mkdir(parents=True, exist_ok=True)
    kept = [line for line in known if line.split(" ")[0] != _host(t)]
    write_atomically(t.known_hosts, "".join(f"{line}\n" for line in kept) + f"{_host(t)} {key}\n")
    if pinned:
        say(f"{t.node} has no cache disk, so it made a new ssh host key when it booted: {fingerprint(key)} (as its "
            "agent reports it; its console printed the same) is pinned now")
        return
    say(f"first contact with {t.node}: its host key {fingerprint(key)} (as its agent reports it; its console "
        "printed the same) is pinned for later connections")


def ssh_argv(t: Target, command: str, identity: Path | None = None) -> list[str]:
    """The ssh command line: the operator's own client and agent (or --identity), builder's options only."""
    argv = ["ssh", "-F", "none", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={t.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
            "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no", "-o", "ForwardAgent=no",
            "-o", "ForwardX11=no", "-o", "ClearAllForwardings=yes", "-o", "LogLevel=ERROR",
            "-p", str(t.port), "-l", "root"]
    if identity is not None:
        argv += ["-o", "IdentitiesOnly=yes", "-i", str(identity)]
    return [*argv, "--", t.address, command]


def reboot(loaded: Loaded, name: str, identity: Path | None, say: Say) -> Target:
    """Reboot a netbooted node over ssh (it netboots its current generation)."""
    require_tools("builder cluster reboot", ("ssh",))
    t = target(loaded, name)
    pin_host_key(t, say)
    try:
        run(ssh_argv(t, REBOOT, identity), timeout=SSH_SECONDS)
    except CommandError as exc:
        raise EngineError(f"{t.node}: ssh root@{t.address} -p {t.port} failed: {exc.last_line}",
                          "use a key listed in admins.keys (your ssh agent's, or --identity FILE), from an address "
                          "in admins.addresses; a changed host key is refused: if the node's cache disk was "
                          f"replaced, remove its line from {t.known_hosts}") from None
    return t

