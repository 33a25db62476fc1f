"""Every node's firewall from a cluster file of either form (the rules themselves: builder/netboot/firewall.py)."""

from pathlib import Path

from builder.cluster.model import Loaded, load_cluster
from builder.core.errors import RecipeError
from builder.netboot.firewall import Firewall, allowed_addresses, for_inventory
from builder.netboot.inventory import load_inventory
from builder.recipe.load import display_path, load_yaml


def for_services(loaded: Loaded) -> list[Firewall]:
    """Every node's firewall from a services-form cluster file (it needs control: and every node's address)."""
    cluster = loaded.cluster
    where = display_path(loaded.path)
    if cluster.control is None:
        raise RecipeError(f"{where}: control: the firewall admits the control node, and none is declared",
                          "control: {address: 10.0.0.1} (the node that runs the gateway)")
    nodes = [(i, n.name, n.address) for i, n in enumerate(cluster.nodes)]
    allowed = tuple(allowed_addresses(where, cluster.control.address, nodes))
    out = []
    for node in cluster.nodes:
        ports = sorted({p.port for p in loaded.processes if p.node == node.name})
        out.append(Firewall(node.name, str(node.address), allowed, tuple(ports)))
    return out


def firewalls(path: Path) -> list[Firewall]:
    """Every node's firewall from a cluster file of either form."""
    data = load_yaml(path, "cluster", "pass the path of your cluster.yaml")
    if "services" in data:
        return for_services(load_cluster(path))
    return for_inventory(load_inventory(path), display_path(path))
