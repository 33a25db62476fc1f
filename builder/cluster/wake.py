"""`builder cluster wake`: Wake-on-LAN for netbooted nodes, so a node that was powered off comes back to boot.

The magic packet goes out as a raw Ethernet frame (EtherType 0x0842) from `control.interface`, the interface on
the boot network that dnsmasq answers on, sent by Debian's `etherwake`. A raw frame on a named interface is
what a node's network card listens for, and it never leaves that network: a UDP broadcast to 255.255.255.255
(`wakeonlan`'s default) would leave by whichever interface holds the default route, which on a control node
with an uplink is the wrong network.
"""

from dataclasses import dataclass

from builder.cluster.model import Loaded
from builder.core.errors import CommandError, EngineError, RecipeError
from builder.core.preflight import require_tools
from builder.core.run import run
from builder.recipe.load import display_path
from builder.recipe.targets import did_you_mean

WAKE = ("etherwake",)


@dataclass(frozen=True)
class Woken:
    node: str
    mac: str
    interface: str


def chosen(loaded: Loaded, names: list[str], every: bool) -> list[str]:
    """The nodes to wake: those named, or every node of the file with --all (never both, never neither)."""
    where = display_path(loaded.path)
    known = [n.name for n in loaded.cluster.nodes]
    if every == bool(names):
        raise RecipeError("builder cluster wake: name the nodes to wake, or give --all",
                          f"nodes: {', '.join(known)}")
    if every:
        return known
    for name in names:
        if name not in known:
            raise RecipeError(f"{where}: no node named {name!r}{did_you_mean(name, known)}",
                              f"nodes: {', '.join(known)}")
    return list(dict.fromkeys(names))


def wake(loaded: Loaded, names: list[str]) -> list[Woken]:
    """Send each node's magic packet on the boot interface; one line, exit 2, before sending any, if one cannot go."""
    where = display_path(loaded.path)
    control = loaded.cluster.control
    if control is None or control.interface is None:
        raise RecipeError(f"{where}: control.interface: waking a node sends its magic packet on the boot network's "
                          "interface, and none is declared", "control: {interface: enp1s0, ...} (the interface "
                          "on the nodes' network)")
    macs: dict[str, str] = {}
    for name in names:
        mac = loaded.node(name).mac
        if not mac:
            raise RecipeError(f"{where}: {name}: has no mac, so builder does not boot it and cannot wake it",
                              "power it on by hand, or give the node its boot interface's mac")
        macs[name] = mac
    require_tools("builder cluster wake", WAKE)
    woken = []
    for name, mac in macs.items():
        try:
            run(["etherwake", "-i", control.interface, "--", mac], timeout=10)
        except CommandError as error:
            # etherwake needs CAP_NET_RAW (root) and an interface that exists and is up
            raise EngineError(f"builder cluster wake: etherwake could not send {name}'s packet on "
                              f"{control.interface}: {error.last_line}",
                              "run it as root on the control node, with the interface up") from None
        woken.append(Woken(name, mac, control.interface))
    return woken
