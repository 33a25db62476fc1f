"""A compute node's nftables rules: `Firewall` (plain data: who may connect) and `ruleset`, the file its
initramfs loads before the root (builder/cluster/firewall.py makes each node's Firewall from a cluster file).

A compute node serves nobody but its cluster: only the gateway on the control node faces users. Its backends
are unauthenticated (ggml RPC, llama-server without a key) or listen on more ports and addresses than they are
told (Ray), so a list of ports would not close them all. The node's firewall therefore refuses every new
connection that does not come from the cluster's own addresses (its nodes and the control node); loopback,
ICMP, DHCP's replies and the replies to the node's own connections pass. The operators' addresses (a cluster
file's `admins:`) reach exactly the admin ports (the node's ssh server) and nothing else. Refused means
refused at once (a TCP reset, an ICMP port-unreachable), so a misplaced client fails fast instead of waiting
for a timeout.

The rules replace only builder's own table, so other rules on the node are left as they are.
"""

import ipaddress
import re
from dataclasses import dataclass

import jinja2
from pydantic import TypeAdapter, ValidationError

from builder import PROJECT_ROOT
from builder.core.errors import RecipeError
from builder.core.types import HostName

TABLE = "builder_cluster"
LEASED = "address leased"  # a node without an address in the file: its rules admit the lease it gets


@dataclass(frozen=True)
class Firewall:
    """One node's view of its cluster: who may connect, and the backend ports named in the rules' comment."""

    node: str
    address: str
    allowed: tuple[str, ...]  # IP addresses, the node's own among them
    ports: tuple[int, ...]  # backend ports this node serves (for the reader; every port is closed to others)
    control: str = ""  # the control node's address, the only one that may reach control_ports
    control_ports: tuple[int, ...] = ()  # the node's gateway agent (plan.py's AGENT_PORT), its journal (JOURNAL_PORT)
    admins: tuple[str, ...] = ()  # the operators' addresses and networks (a cluster file's admins:)
    admin_ports: tuple[int, ...] = ()  # the only ports those may reach (the node's ssh server)


def _ip(value: str | None, where: str, field: str, fix: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value or "")
    except ValueError:
        raise RecipeError(f"{where}: {field}: the firewall admits addresses, and "
                          + (f"{value!r} is a name" if value else "none is given"), fix) from None


def allowed_addresses(where: str, control: str | None, nodes: list[tuple[int, str | None]],
                      every_node: bool = True, extra: set[str] | None = None) -> list[str]:
    """The control node's and the nodes' addresses (each node needs one with `every_node`) and `extra`, sorted."""
    allowed = {str(_ip(control, where, "control.address",
                       "give the control node's IP address (it runs the gateway and serves the boot files)"))}
    allowed.update(extra or ())
    for i, address in nodes:
        if not every_node and not address:
            continue
        allowed.add(str(_ip(address, where, f"nodes[{i}].address",
                            "reserve an IP address for every node in your DHCP server and write it here")))
    return sorted(allowed, key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a)))


_HOST = TypeAdapter(HostName)
_SOURCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # the cluster file's name, as the comment gives it


def ruleset(firewall: Firewall, source: str) -> str:
    """The node's nftables file (images/firewall/node.nft.j2): `nft -f FILE` replaces builder's table and nothing
    else. Every value is checked again here, whoever built the Firewall: a host name, the file's plain name, IP
    literals (written in their normal form) and port numbers; nothing else reaches the file's structure."""
    try:
        _HOST.validate_python(firewall.node)
    except ValidationError:
        raise RecipeError(f"firewall: {firewall.node!r} / {source!r}: not a plain host name and file name") from None
    if not _SOURCE.fullmatch(source):
        raise RecipeError(f"firewall: {firewall.node!r} / {source!r}: not a plain host name and file name")
    try:
        allowed = [ipaddress.ip_address(a) for a in firewall.allowed]
        if firewall.address != LEASED:
            ipaddress.ip_address(firewall.address)
        control = ipaddress.ip_address(firewall.control) if firewall.control_ports else None
    except ValueError as exc:
        raise RecipeError(f"firewall: {firewall.node}: {exc}", "addresses in the rules are IP literals") from None
    ports = (*firewall.ports, *firewall.control_ports, *firewall.admin_ports)
    if not all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in ports):
        raise RecipeError(f"firewall: {firewall.node}: ports {ports!r} are not port numbers")
    admins = _admin_sets(firewall)
    sets = [{"name": name, "family": family, "match": match, "members": [str(a) for a in allowed if a.version == v]}
            for v, name, family, match in ((4, "cluster4", "ipv4_addr", "ip"), (6, "cluster6", "ipv6_addr", "ip6"))]
    return _template().render(source=source, node=firewall.node, address=firewall.address, table=TABLE,
                              ports=[str(p) for p in firewall.ports], sets=[s for s in sets if s["members"]],
                              control={"match": "ip" if control.version == 4 else "ip6", "address": str(control),
                                       "ports": [str(p) for p in firewall.control_ports]} if control else None,
                              admins=admins, admin_ports=[str(p) for p in firewall.admin_ports])


def _admin_sets(firewall: Firewall) -> list[dict[str, object]]:
    """The operators' networks as nftables interval sets, one per family (none without admin ports)."""
    if not firewall.admins or not firewall.admin_ports:
        return []
    try:
        networks = [ipaddress.ip_network(a, strict=True) for a in firewall.admins]
    except ValueError as exc:
        raise RecipeError(f"firewall: {firewall.node}: {exc}", "admins' addresses are IP networks") from None
    if any(n.prefixlen == 0 for n in networks):
        raise RecipeError(f"firewall: {firewall.node}: an admins network is every address")
    return [{"name": name, "family": family, "match": match,
             "members": [str(n.network_address) if n.num_addresses == 1 else str(n) for n in networks
                         if n.version == v]}
            for v, name, family, match in ((4, "admins4", "ipv4_addr", "ip"), (6, "admins6", "ipv6_addr", "ip6"))
            if any(n.version == v for n in networks)]


def _template() -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(PROJECT_ROOT / "images" / "firewall"),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    return env.get_template("node.nft.j2")
