"""`builder cluster export --format prometheus`: a Prometheus scrape config for the netbooted nodes' exporters.

With `admins:` every netbooted node runs prometheus-node-exporter on its address and `admins.metrics_port`
(images/netboot/metrics.sh: GPU use and memory from sysfs, power and temperatures where the hardware exposes
them, CPU, memory, network). The node's firewall admits `admins.addresses` (and the cluster's own) on that
port only, so the Prometheus that uses this file runs on one of those hosts or on the control node. One job
for the cluster, one target per node, labelled with the node's name and what it runs.
"""

import yaml

from builder.cluster.export_kube import Export, plain_stem
from builder.cluster.model import Loaded
from builder.core.errors import RecipeError
from builder.recipe.load import display_path

FILE = "prometheus.yml"
SCRAPE_INTERVAL = "15s"


def export_prometheus(loaded: Loaded) -> Export:
    """prometheus.yml, and the steps to use it."""
    where = display_path(loaded.path)
    admins = loaded.cluster.admins
    if admins is None:
        raise RecipeError(f"{where}: admins: none, so the nodes run no exporter to scrape",
                          "add admins: with the address Prometheus scrapes from (docs/clusters.md), then "
                          "`builder pxe publish` and reboot the nodes")
    nodes = loaded.cluster.netbooted
    if not nodes:
        raise RecipeError(f"{where}: nodes: no node has a mac:, and only netbooted nodes run builder's exporter",
                          "run prometheus-node-exporter on the other boxes yourself")
    index = {n.name: i for i, n in enumerate(loaded.cluster.nodes)}
    targets = []
    for node in nodes:
        if not node.address:
            raise RecipeError(f"{where}: nodes[{index[node.name]}].address: {node.name} needs one to be scraped",
                              "reserve an address for the node in your DHCP server and write it here")
        host = f"[{node.address}]" if ":" in node.address else node.address
        labels = {"node": node.name, "target": ", ".join(node.targets)}
        targets.append({"targets": [f"{host}:{admins.metrics_port}"], "labels": labels})
    config = {"scrape_configs": [{"job_name": f"builder-nodes-{plain_stem(loaded.path)}",
                                  "scrape_interval": SCRAPE_INTERVAL, "static_configs": targets}]}
    head = (f"# Written by builder from {loaded.path.name}: regenerate it with `builder cluster export "
            f"{loaded.path.name} --format prometheus`.\n# The nodes' firewall admits this port from admins.addresses "
            "and the cluster's own addresses only.\n")
    steps = [f"merge scrape_configs into your Prometheus config on a host in admins.addresses "
             f"({', '.join(admins.addresses)}) or on the control node, then reload Prometheus"]
    return Export({FILE: head + yaml.safe_dump(config, sort_keys=False)}, (), tuple(steps), {})
