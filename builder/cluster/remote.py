"""The gateway of a netbooted cluster: HAProxy on the control node in front of the nodes' servers.

`builder cluster up FILE` (without --local) starts only this: the nodes boot from `builder pxe publish`'s
generation and start their own servers and RPC workers. HAProxy runs as a process on the control node (as with
--local), from the config builder/cluster/gateway.py writes, with every server at its node's `address`. It
binds `gateway.address`, else `control.address`: never a wildcard address unless the file asks for one.
"""

import errno
import ipaddress
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.cluster.gateway import (
    ServerState,
    apply_config,
    gateway_pid,
    read_stats,
    save_server_state,
    stop_gateway,
    write_gateway,
)
from builder.cluster.model import Loaded, Process
from builder.cluster.nodestate import node_document, read_state
from builder.cluster.ssh import host_keys, node_units
from builder.cluster.units import gateway_unit, gateway_unit_name
from builder.core.errors import BuilderError, RecipeError
from builder.core.units import UNIT_DIR, Unit, install, is_active, require_systemd, systemctl
from builder.recipe.load import display_path

Say = Callable[[str], None]
HEALTH_WAIT = 1.0
WORKER_PROBE = 2.0


@dataclass(frozen=True)
class Remote:
    """Where one cluster file's netboot gateway keeps its state (config, key, pid file)."""

    loaded: Loaded
    state: Path
    bind: str

    @classmethod
    def of(cls, loaded: Loaded) -> "Remote":
        return cls(loaded, loaded.state_folder("netboot-")[1], bind_address(loaded))

    @property
    def pidfile(self) -> Path:
        return self.state / "haproxy.pid"

    @property
    def endpoint(self) -> str:
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"http://{host}:{self.loaded.cluster.gateway.port}/v1"

    @property
    def key_file(self) -> Path:
        key_file = self.loaded.cluster.gateway.key_file
        return self.loaded.path.parent / key_file if key_file else self.state / "api-key"


def bind_address(loaded: Loaded) -> str:
    """gateway.address, else control.address; a wildcard only when gateway.address says so."""
    cluster = loaded.cluster
    where = display_path(loaded.path)
    if cluster.gateway.address:
        return cluster.gateway.address
    if cluster.control is None:
        raise RecipeError(f"{where}: gateway.address: the gateway runs on the control node, and neither it nor "
                          "control: is declared", "control: {address: 10.0.0.1}, or gateway.address: ADDRESS")
    try:
        wildcard = ipaddress.ip_address(cluster.control.address).is_unspecified
    except ValueError:
        wildcard = False
    if wildcard:
        raise RecipeError(f"{where}: control.address: {cluster.control.address} is every address, not the "
                          "control node's", "give the control node's own address (or gateway.address: to choose)")
    return cluster.control.address


def addresses(loaded: Loaded) -> dict[str, str]:
    """Every node that runs a server, at its `address` (what the gateway connects to)."""
    where = display_path(loaded.path)
    out: dict[str, str] = {}
    for i, node in enumerate(loaded.cluster.nodes):
        if node.address:
            out[node.name] = node.address
        elif any(p.node == node.name for p in loaded.processes):
            raise RecipeError(f"{where}: nodes[{i}].address: the gateway and the node's peers reach "
                              f"{node.name} there, and none is given",
                              "reserve an address for the node in your DHCP server and write it here")
    return out


def up(loaded: Loaded, timeout: float, say: Say, strict: bool = False, installed: bool = False) -> Remote:
    """Start (or keep) the gateway and wait until every server is healthy behind it. A node that is off or
    broken does not hold the others back: after `timeout` the gateway keeps serving what is healthy and each
    server still waiting is one warning line. Only when nothing is healthy (or `strict`, when anything is not)
    is that an error, and the gateway this call started is stopped again."""
    remote = Remote.of(loaded)
    where = addresses(loaded)
    previous = (remote.state / "haproxy.cfg").read_text() if (remote.state / "haproxy.cfg").is_file() else None
    config = write_gateway(loaded, remote.state, remote.bind, where, frozenset(loaded.agent_nodes()))
    started = False
    if installed or (UNIT_DIR / gateway_unit_name(loaded)).is_file():  # systemd runs it; never stopped here
        _under_systemd(remote, config.read_text() != previous, say)
    # A running gateway with the same config keeps serving; a changed one is reloaded (requests in flight
    # finish on the old worker).
    elif gateway_pid(remote.pidfile) is None or config.read_text() != previous:
        if gateway_pid(remote.pidfile) is None:
            _can_bind(loaded, remote.bind)
            say(f"starting the gateway on {remote.bind}:{loaded.cluster.gateway.port}")
        started = apply_config(config, remote.pidfile)
        if not started:
            say("reloaded the gateway with the new config")
    try:
        waiting, servers = _wait_healthy(remote, where, timeout, strict)
    except BaseException:
        if started:
            stop_gateway(remote.pidfile)
        raise
    for process in waiting:
        say(f"warning: {process.service} on {process.node} ({where[process.node]}:{process.port}) is DOWN after "
            f"{timeout:.0f} s: the gateway serves without it and adds it when it passes its health check")
    if waiting:
        say(f"warning: serving with {len(servers) - len(waiting)} of {len(servers)} servers "
            "(`builder cluster status` shows which; --strict makes this an error)")
    return remote


def unit_of(remote: Remote) -> Unit:
    """The gateway's systemd unit (`builder cluster up --install --print` shows it)."""
    return gateway_unit(remote.loaded, remote.state, shutil.which("haproxy") or "/usr/sbin/haproxy",
                        shutil.which("kill") or "/usr/bin/kill")


def _under_systemd(remote: Remote, changed: bool, say: Say) -> None:
    """The unit written and enabled (a gateway an earlier `up` started as a process gives way to it), and a
    changed config reloaded without dropping requests. The unit stays whether or not the servers are healthy
    yet: the nodes may boot later."""
    require_systemd("builder cluster up")
    unit = unit_of(remote)
    was_active = is_active(unit.name)
    if not was_active:
        if gateway_pid(remote.pidfile) is not None:
            say("stopping the gateway `builder cluster up` started, for its systemd unit")
            stop_gateway(remote.pidfile)
        _can_bind(remote.loaded, remote.bind)
    [done] = install([unit])
    if done.state == "unchanged" and was_active and changed:
        save_server_state(remote.state)  # a drained node stays drained
        systemctl("reload", "--", unit.name)  # new workers on the new config; the old ones finish their requests
        say(f"reloaded {unit.name} with the new config")
    else:
        say(f"{unit.name} {done.state}; enabled at boot, running")


def _can_bind(loaded: Loaded, bind: str) -> None:
    """One line instead of HAProxy's alerts when the gateway's address is not this machine's or its port is
    taken (binding tells, and sends nothing)."""
    port = loaded.cluster.gateway.port
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bind, port))
        except OSError as exc:
            where = display_path(loaded.path)
            if exc.errno == errno.EADDRNOTAVAIL:
                raise RecipeError(f"{where}: gateway.address: {bind} is not an address of this machine",
                                  "run `builder cluster up` on the control node, or set gateway.address to "
                                  "one of this machine's addresses") from None
            raise RecipeError(f"{where}: gateway.port: cannot listen on {bind}:{port}: {exc.strerror}",
                              "stop what uses the port, or set gateway.port") from None


def _wait_healthy(remote: Remote, where: dict[str, str], timeout: float, strict: bool
                  ) -> tuple[list[Process], list[Process]]:
    """(the servers still not healthy after `timeout`, every server); an error when none is healthy, or with
    `strict` when one is not."""
    servers = [p for p in remote.loaded.processes if p.role == "server"]
    deadline = time.monotonic() + timeout
    while True:
        states = {(s.service, s.node): s.healthy for s in read_stats(remote.loaded.cluster.gateway.metrics_port)}
        waiting = [p for p in servers if not states.get((p.service, p.node))]
        if not waiting:
            return [], servers
        if time.monotonic() > deadline and len(waiting) < len(servers) and not strict:
            return waiting, servers
        if time.monotonic() > deadline:
            first = waiting[0]
            raise BuilderError(
                f"{first.service} on {first.node} ({where[first.node]}:{first.port}) is not healthy after "
                f"{timeout:.0f} s ({len(waiting)} of {len(servers)} servers waiting)",
                "has the node booted? its console prints `builder-node: NODE server SERVICE ready`; "
                "raise --timeout for slow boots or big models")
        time.sleep(HEALTH_WAIT)


def down(loaded: Loaded) -> list[str]:
    """Stop the gateway (and disable its unit, kept for the next `up`); the nodes keep running (power them
    off, or publish a generation without them)."""
    name = gateway_unit_name(loaded)
    if (UNIT_DIR / name).is_file() and Path("/run/systemd/system").is_dir():
        active = is_active(name)
        systemctl("disable", "--now", "--", name)
        return [f"gateway ({name} disabled)"] if active else []
    return ["gateway"] if stop_gateway(Remote.of(loaded).pidfile) else []


def _port_open(address: str, port: int) -> bool:
    if not address:
        return False
    try:
        with socket.create_connection((address, port), timeout=WORKER_PROBE):
            return True
    except OSError:
        return False


def on_network(address: str, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """Whether this machine reaches `address` from an address of its own in `network` (the data network): the
    kernel's choice of source for a UDP socket connected there (nothing is sent)."""
    family = socket.AF_INET6 if network.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((address, 9))
            source = probe.getsockname()[0]
    except OSError:
        return False
    return ipaddress.ip_address(source) in network


def status(loaded: Loaded, root: Path | None = None) -> dict[str, object]:
    """Services, nodes and every process's health (servers as the gateway's health checks see them, RPC workers
    by a connection from the control node), and each netbooted node's units and state as its agent reports them
    (with `root`, the pxe-root: which generation it runs and which it should), as one document."""
    remote = Remote.of(loaded)
    where = {n.name: n.address or "" for n in loaded.cluster.nodes}
    # RPC workers listen on the data network when their node is on it (docs/netboot.md)
    peers = {n.name: n.peer_address or "" for n in loaded.cluster.nodes}
    running = gateway_pid(remote.pidfile) is not None
    stats: dict[tuple[str, str], ServerState] = {}
    if running:
        try:
            stats = {(s.service, s.node): s for s in read_stats(loaded.cluster.gateway.metrics_port)}
        except BuilderError:
            running = False
    keys = host_keys(loaded)  # each node's ssh host-key fingerprint, as its agent reports it (with admins:)
    agents = loaded.agent_hosts()
    asked = [n for n in loaded.cluster.netbooted if n.address and n.name in agents]
    units = {n.name: node_units(str(n.address)) for n in asked}
    states = {n.name: node_document(read_state(str(n.address)), root, n.file_stem) for n in asked}
    services = []
    for service in loaded.cluster.services:
        processes = []
        for process in (p for p in loaded.processes if p.service == service.name):
            address = (peers if process.role == "rpc-worker" else where)[process.node]
            entry: dict[str, object] = {"node": process.node, "role": process.role,
                                        "address": f"{address}:{process.port}"}
            state = stats.get((process.service, process.node)) if process.role == "server" else None
            if state is not None:
                entry.update(state.fields())
            elif process.role == "rpc-worker":
                data = loaded.node(process.node).data_interface
                if data is not None and not on_network(data.ip, data.network):
                    # not a problem: this machine cannot see it; its head's health check covers it
                    entry["health"] = "unchecked"
                    entry["why"] = f"on the data network {data.network}, which this machine is not on"
                else:
                    entry["health"] = "UP" if _port_open(address, process.port) else "DOWN"
            else:
                entry["health"] = "unknown"  # no gateway running to check it
            processes.append(entry)
        services.append({"name": service.name, "topology": service.topology, "processes": processes})
    return {
        "cluster": str(loaded.path), "mode": "netboot",
        "gateway": {"endpoint": remote.endpoint, "running": running, "key_file": str(remote.key_file),
                    "metrics": f"http://127.0.0.1:{loaded.cluster.gateway.metrics_port}/metrics"},
        "nodes": [{"name": n.name, "address": where[n.name], "target": n.target, "devices": n.devices_json,
                   "mac": n.mac, **({"ssh_host_key": keys.get(n.name)} if loaded.cluster.admins else {}),
                   **({"units": units[n.name]} if n.name in units else {}), **states.get(n.name, {})}
                  for n in loaded.cluster.nodes],
        "services": services,
    }
