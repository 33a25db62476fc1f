"""Every node's firewall from a cluster file (the rules themselves: builder/netboot/firewall.py)."""

from pathlib import Path

from builder.cluster.model import Loaded, load_cluster
from builder.core.errors import RecipeError
from builder.netboot.firewall import LEASED, Firewall, allowed_addresses
from builder.netboot.nodeunits import JOURNAL_PORT
from builder.netboot.plan import AGENT_PORT
from builder.recipe.load import display_path


def for_services(loaded: Loaded, leased: bool = False) -> list[Firewall]:
    """Every node's firewall (it needs control: and every node's address). With `leased`, a node without an
    address leases one: its own rules admit that lease at boot (the initramfs adds it), but the other nodes'
    rules cannot name it."""
    cluster = loaded.cluster
    where = display_path(loaded.path)
    if cluster.control is None:
        raise RecipeError(f"{where}: control: the firewall admits the control node, and none is declared",
                          "control: {address: 10.0.0.1} (the node that runs the gateway)")
    nodes = [(i, n.address) for i, n in enumerate(cluster.nodes)]
    # the data network's addresses too: the rules match sources, not interfaces, so they cover both
    data = {n.data_interface.ip for n in cluster.nodes if n.data_interface}
    allowed = tuple(allowed_addresses(where, cluster.control.address, nodes, every_node=not leased, extra=data))
    agents = loaded.agent_hosts()
    admins = cluster.admins
    operators = (tuple(admins.addresses), admins.ports) if admins else ((), ())

    out = []
    for node in cluster.nodes:
        ports = sorted({p.port for p in loaded.processes if p.node == node.name})
        # the gateway's agent-check and the journal's reader (`cluster logs`) are the control node: no other node
        # may ask the agent or read the node's journal
        control = (AGENT_PORT, JOURNAL_PORT) if node.name in agents else (JOURNAL_PORT,)
        out.append(Firewall(node.name, str(node.address or LEASED), allowed, tuple(ports),
                            str(cluster.control.address), control, *operators))
    return out


def firewalls(path: Path) -> list[Firewall]:
    """Every node's firewall from a cluster file."""
    return for_services(load_cluster(path))
