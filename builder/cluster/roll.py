"""Drain, enable and roll: a node out of the gateway's rotation and back (HAProxy's runtime API,
builder/cluster/runtime.py), and a netboot generation rolled onto the nodes one group at a time.

A roll moves each group (a node, or a split service's head with its workers: they must run one llama.cpp) in
turn: drain its servers, pin its nodes to the target generation (pxe-root/pins, builder/netboot/publish.py),
reboot them, wait until every server of the group passes its health check again (llama-server's /health, and on a
netbooted node the agent that reports a missing device or a failed qualification), then enable them. When a step
fails, the group is pinned back to the generation it ran, rebooted again, enabled once it serves, and the roll
stops. Before the first group every node is pinned to the generation it runs, so a node that reboots on its own
during the roll comes back as it was; after the last group the target becomes `current` and the pins go.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.cluster import runtime
from builder.cluster.local import Local
from builder.cluster.model import Loaded
from builder.cluster.remote import Remote
from builder.core.errors import BuilderError
from builder.netboot import publish

Say = Callable[[str], None]
Reboot = Callable[[str], None]
# How often a roll looks at the gateway's view of a rebooting node.
POLL_SECONDS = 0.5


def gateway_state(loaded: Loaded, is_local: bool) -> Path:
    """The state folder of the cluster file's gateway (local containers', or the netbooted nodes')."""
    return Local.of(loaded).state if is_local else Remote.of(loaded).state


def drain(state: Path, node: str, timeout: float, say: Say) -> list[str]:
    """`node`'s servers get no new requests; returns (their backends) once none is in flight."""
    sock = runtime.socket_path(state)
    runtime.drain(sock, node, timeout, say)
    return [s.backend for s in runtime.node_servers(sock, node)]


def enable(state: Path, node: str) -> list[str]:
    return runtime.set_state(runtime.socket_path(state), node, "ready")


def groups(loaded: Loaded, canary: str | None = None) -> list[list[str]]:
    """The netbooted nodes in the groups a roll moves together, the canary's group first, then in file order: a
    service with workers (a split: its head and rpc or pipeline workers) joins all of its nodes."""
    booted = [n.name for n in loaded.cluster.netbooted]
    parent = {n: n for n in booted}

    def root(n: str) -> str:
        while parent[n] != n:
            n = parent[n]
        return n
    for service in loaded.cluster.services:
        procs = [p for p in loaded.processes if p.service == service.name and p.node in parent]
        if any(p.role != "server" for p in procs):
            for p in procs[1:]:
                parent[root(p.node)] = root(procs[0].node)
    found: dict[str, list[str]] = {}
    for n in booted:
        found.setdefault(root(n), []).append(n)
    out = list(found.values())
    if canary is not None:
        out.sort(key=lambda group: canary not in group)
    return out


@dataclass(frozen=True)
class Plan:
    target: str
    previous: dict[str, str]  # node -> the generation it runs now
    stems: dict[str, str]  # node -> its MAC as its boot files name it
    groups: list[list[str]]


def plan(loaded: Loaded, root: Path, generation: str, canary: str | None) -> Plan:
    """What a roll to `generation` (an id, a unique start, `current` or `previous`) does. A node runs its pin's
    generation when it has one; else the current one, or when the target is already current (published, not yet
    rolled), the generation published before it."""
    target = publish.resolve(root, generation)
    ids = [g.id for g in publish.generations(root)]
    live = publish.current_id(root)
    before = ids[ids.index(target) - 1] if target == live and ids.index(target) > 0 else live
    pins = publish.pins(root)
    stems = {n.name: n.file_stem for n in loaded.cluster.netbooted}
    scripts = root / "generations" / target / "nodes"
    missing = [n for n, stem in stems.items() if not (scripts / f"{stem}.ipxe").is_file()]
    if missing:
        raise BuilderError(f"generation {target} has no boot files for {', '.join(missing)}",
                           "publish the cluster file first: builder pxe publish FILE")
    previous = {}
    for name, stem in stems.items():
        was = pins.get(stem) or before
        if was is None:
            raise BuilderError(f"{name}: no generation to go back to (none before {target})",
                               "publish the generation the nodes run first, or boot them with `builder pxe publish`")
        previous[name] = was
    return Plan(target, previous, stems, groups(loaded, canary))


def _servers(loaded: Loaded, nodes: list[str]) -> list[str]:
    """The nodes of `nodes` that run a server behind the gateway."""
    return [n for n in nodes if any(p.node == n and p.role == "server" for p in loaded.processes)]


def wait_rebooted(sock: Path, nodes: list[str], timeout: float, say: Say) -> None:
    """Returns once each node's servers have failed their health check (the node went down) and then pass it
    again (it came back and serves); an error after `timeout`."""
    deadline = time.monotonic() + timeout
    went_down: set[str] = set()
    while True:
        state = {n: runtime.node_servers(sock, n) for n in nodes}
        for node, servers in state.items():
            if node not in went_down and not all(s.serving for s in servers):
                went_down.add(node)
                say(f"{node}: down (rebooting)")
        if went_down == set(nodes) and all(s.serving for servers in state.values() for s in servers):
            return
        if time.monotonic() > deadline:
            quiet = sorted(set(nodes) - went_down)
            if quiet:
                raise BuilderError(f"{', '.join(quiet)} never went down within {timeout:.0f} s: did it reboot?",
                                   "check the reboot command, or the node's console")
            bad = sorted(n for n, servers in state.items() if not all(s.serving for s in servers))
            checks = ", ".join(f"{s.node} {s.status} {s.check or '?'}" for n in bad for s in state[n])
            raise BuilderError(f"{', '.join(bad)} did not serve within {timeout:.0f} s of its reboot ({checks})",
                               f"see why: builder cluster status FILE; builder cluster logs FILE {bad[0]}")
        time.sleep(POLL_SECONDS)


def _move(loaded: Loaded, state: Path, root: Path, stems: dict[str, str], group: list[str], to: dict[str, str],
          reboot: Reboot, timeout: float, drain_timeout: float, say: Say) -> None:
    sock = runtime.socket_path(state)
    serving = _servers(loaded, group)
    for node in serving:
        say(f"{node}: draining")
        runtime.drain(sock, node, drain_timeout, say)
    for node in group:
        publish.pin(root, stems[node], to[node])
        say(f"{node}: boots generation {to[node]} from its next boot")
    for node in group:
        say(f"{node}: rebooting")
        reboot(node)
    if serving:
        wait_rebooted(sock, serving, timeout, say)
    else:
        say(f"note: {', '.join(group)} run(s) no server behind the gateway: not checked after the reboot")
    for node in serving:
        runtime.set_state(sock, node, "ready")
        say(f"{node}: serving, enabled")


def roll(loaded: Loaded, state: Path, root: Path, rolling: Plan, reboot: Reboot, timeout: float,
         drain_timeout: float, say: Say) -> None:
    """Move every group to the plan's target in turn (module docstring); a BuilderError when a group failed and
    was put back."""
    with_servers = _servers(loaded, [n for g in rolling.groups for n in g])
    sock = runtime.socket_path(state)
    for node in with_servers:
        runtime.node_servers(sock, node)  # each must be known to the gateway before anything moves
    for name, was in rolling.previous.items():
        publish.pin(root, rolling.stems[name], was)
    for group in rolling.groups:
        if all(rolling.previous[n] == rolling.target for n in group):
            say(f"{', '.join(group)}: already on generation {rolling.target}")
            continue
        say(f"== {', '.join(group)}: generation {rolling.previous[group[0]]} -> {rolling.target}")
        try:
            _move(loaded, state, root, rolling.stems, group, {n: rolling.target for n in group}, reboot, timeout,
                  drain_timeout, say)
        except BuilderError as exc:
            say(f"{', '.join(group)}: {exc.message}; going back to the generation it ran")
            back = ""
            try:
                _move(loaded, state, root, rolling.stems, group, rolling.previous, reboot, timeout, drain_timeout, say)
                back = f"{', '.join(group)} is back on its previous generation and serving"
            except BuilderError as again:
                back = (f"{', '.join(group)} is pinned back to its previous generation but did not come back "
                        f"({again.message})")
            raise BuilderError(f"the roll stopped at {', '.join(group)}: {exc.message}. {back}; the nodes not "
                               "rolled yet are pinned to the generation they run",
                               exc.hint or "fix the generation, publish it, and roll again") from None
    publish.rollback(root, rolling.target)  # `current` -> the target (a no-op when it is already)
    for stem in rolling.stems.values():
        publish.pin(root, stem, None)
    say(f"every node runs generation {rolling.target}: it is current, the pins are cleared")
