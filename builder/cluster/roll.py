"""Drain, enable and roll: a node out of the gateway's rotation and back (HAProxy's runtime API,
builder/cluster/runtime.py), and a netboot generation rolled onto the nodes one group at a time."""

from collections.abc import Callable
from pathlib import Path

from builder.cluster import runtime
from builder.cluster.local import Local
from builder.cluster.model import Loaded
from builder.cluster.remote import Remote

Say = Callable[[str], None]


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
