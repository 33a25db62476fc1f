"""A compute node's nftables rules: `Firewall` (plain data: who may connect) and `ruleset`, the file its
initramfs loads before the root; and the firewalls of the netboot-only form's nodes.

A compute node serves nobody but its cluster: only the gateway on the control node faces users. Its backends
are unauthenticated (ggml RPC, llama-server without a key) or listen on more ports and addresses than they are
told (Ray), so a list of ports would not close them all. The node's firewall therefore refuses every new
connection that does not come from the cluster's own addresses (its nodes and the control node); loopback,
ICMP, DHCP's replies and the replies to the node's own connections pass. Refused means refused at once (a TCP
reset, an ICMP port-unreachable), so a misplaced client fails fast instead of waiting for a timeout.

The rules replace only builder's own table, so other rules on the node are left as they are.
"""

import ipaddress
from dataclasses import dataclass

from builder.core.errors import RecipeError
from builder.netboot.inventory import DEFAULT_PORTS
from builder.netboot.inventory import Cluster as NetbootCluster

TABLE = "builder_cluster"


@dataclass(frozen=True)
class Firewall:
    """One node's view of its cluster: who may connect, and the backend ports named in the rules' comment."""

    node: str
    address: str
    allowed: tuple[str, ...]  # IP addresses, the node's own among them
    ports: tuple[int, ...]  # backend ports this node serves (for the reader; every port is closed to others)


def _ip(value: str | None, where: str, field: str, fix: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value or "")
    except ValueError:
        raise RecipeError(f"{where}: {field}: the firewall admits addresses, and "
                          + (f"{value!r} is a name" if value else "none is given"), fix) from None


def allowed_addresses(where: str, control: str | None, nodes: list[tuple[int, str, str | None]],
             every_node: bool = True) -> list[str]:
    allowed = {str(_ip(control, where, "control.address",
                       "give the control node's IP address (it runs the gateway and serves the boot files)"))}
    for i, _name, address in nodes:
        if not every_node and not address:
            continue
        allowed.add(str(_ip(address, where, f"nodes[{i}].address",
                            "reserve an IP address for every node in your DHCP server and write it here")))
    return sorted(allowed, key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a)))


def for_inventory(cluster: NetbootCluster, where: str) -> list[Firewall]:
    """Every node's firewall from the netboot-only form (nodes with roles)."""
    nodes = [(i, n.name, n.address) for i, n in enumerate(cluster.nodes)]
    allowed = tuple(allowed_addresses(where, cluster.control.address, nodes))
    return [Firewall(n.name, str(n.address), allowed, (n.port or DEFAULT_PORTS[n.role],)) for n in cluster.nodes]


def for_netboot(cluster: NetbootCluster, where: str) -> dict[str, Firewall]:
    """node name -> its firewall, for `pxe publish`. A node without an address leases one: its own rules admit
    it at boot (the initramfs adds the leased address), but the other nodes' rules cannot name it."""
    nodes = [(i, n.name, n.address) for i, n in enumerate(cluster.nodes)]
    allowed = tuple(allowed_addresses(where, cluster.control.address, nodes, every_node=False))
    return {n.name: Firewall(n.name, str(n.address or "address leased"), allowed, (n.port or DEFAULT_PORTS[n.role],))
            for n in cluster.nodes}


def ruleset(firewall: Firewall, source: str) -> str:
    """The node's nftables file: `nft -f FILE` replaces builder's table and nothing else."""
    v4 = [a for a in firewall.allowed if ipaddress.ip_address(a).version == 4]
    v6 = [a for a in firewall.allowed if ipaddress.ip_address(a).version == 6]
    ports = ", ".join(str(p) for p in firewall.ports) or "none"
    lines = [
        f"# Written by builder from {source} for node {firewall.node} ({firewall.address}): regenerate it, "
        "do not edit.",
        f"# Its backend ports ({ports}) and every other port accept new connections from the cluster only.",
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
    ]
    for family, name, members in (("ipv4_addr", "cluster4", v4), ("ipv6_addr", "cluster6", v6)):
        if members:
            lines += [f"    set {name} {{", f"        type {family}", f"        elements = {{ {', '.join(members)} }}",
                      "    }"]
    lines += [
        "    chain input {",
        "        type filter hook input priority filter; policy accept;",
        "        ct state established,related accept",
        "        ct state invalid drop",
        "        ip saddr 127.0.0.0/8 accept",
        "        ip6 saddr ::1 accept",
    ]
    if v4:
        lines.append("        ip saddr @cluster4 accept")
    if v6:
        lines.append("        ip6 saddr @cluster6 accept")
    lines += [
        "        meta l4proto { icmp, ipv6-icmp } accept",
        "        # the DHCP server's answers to the node's own lease requests",
        "        udp sport 67 udp dport 68 accept",
        "        meta nfproto ipv6 udp sport 547 udp dport 546 accept",
        "        meta l4proto tcp reject with tcp reset",
        "        reject with icmpx type port-unreachable",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"
