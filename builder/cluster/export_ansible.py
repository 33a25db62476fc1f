"""`builder cluster export --format ansible`: an inventory and a playbook that put a cluster file's services on
the boxes builder does not boot (nodes without a `mac`), with nothing but ansible-core's own modules.

The files it writes, and why the models come from the control node's `builder pxe serve` by sha256 (a vLLM
model folder, no single file, is copied by hand): docs/clusters.md, "An Ansible playbook".
"""

import re
from pathlib import Path
from typing import Any

import yaml

from builder.cluster.commands import is_ray_pipeline
from builder.cluster.export_kube import Export, Models
from builder.cluster.export_quadlet import render
from builder.cluster.firewall import for_services
from builder.cluster.model import Loaded
from builder.core.errors import RecipeError
from builder.netboot.firewall import ruleset
from builder.netboot.publish import base_url
from builder.recipe.load import display_path

HEADER = "# Written by `builder cluster export --format ansible` from {source}: regenerate it, do not edit.\n"
RULES = "/etc/builder/firewall.nft"
FIREWALL_UNIT = "builder-firewall.service"
QUADLET_DIR = "/etc/containers/systemd"
_SOURCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def group_name(kind: str, name: str, taken: dict[str, str]) -> str:
    """An Ansible group name (letters, digits, '_') for a target or a service; two names that would meet get
    the second a suffix of its own."""
    group = f"{kind}_{re.sub(r'[^A-Za-z0-9_]', '_', name)}"
    if taken.get(group, name) != name:
        group = f"{group}_{len(taken)}"
    taken[group] = name
    return group


def _dump(source: str, what: str, data: Any) -> str:
    return HEADER.format(source=source) + f"# {what}\n" + yaml.safe_dump(data, sort_keys=False, width=1000)


def firewall_unit(source: str) -> str:
    return HEADER.format(source=source) + render({
        "Unit": [("Description", "builder: the cluster's firewall (nftables table builder_cluster)"),
                 ("DefaultDependencies", "no"), ("Before", "network-pre.target"), ("Wants", "network-pre.target"),
                 ("After", "local-fs.target")],
        "Service": [("Type", "oneshot"), ("RemainAfterExit", "yes"), ("ExecStart", f"/usr/sbin/nft -f {RULES}")],
        "Install": [("WantedBy", "multi-user.target")]})


def playbook(source: str, models: Models) -> list[dict[str, Any]]:
    """The one play: every task an ansible.builtin module, every value per node from its host_vars."""
    started = "{{ 'restarted' if %s.changed else 'started' }}"
    tasks: list[dict[str, Any]] = [
        {"name": "podman (with Quadlet) and nftables from the node's own apt",
         "ansible.builtin.apt": {"name": ["podman", "nftables"], "state": "present"}},
        {"name": "the folders for the units, the models and the firewall",
         "ansible.builtin.file": {"path": "{{ item }}", "state": "directory", "mode": "0755"},
         "loop": [QUADLET_DIR, models.path, str(Path(RULES).parent)]},
        {"name": "each model from the control node, checked by its sha256",
         "ansible.builtin.get_url": {"url": "{{ item.url }}", "dest": "{{ item.dest }}",
                                     "checksum": "sha256:{{ item.sha256 }}", "mode": "0644", "timeout": 60},
         "loop": "{{ builder_models }}", "loop_control": {"label": "{{ item.service }} {{ item.sha256 }}"}},
        {"name": "the node's firewall rules",
         "ansible.builtin.copy": {"src": "firewall/{{ inventory_hostname }}.nft", "dest": RULES, "mode": "0644"},
         "register": "builder_rules"},
        {"name": "the unit that loads them, at every boot too",
         "ansible.builtin.copy": {"src": FIREWALL_UNIT, "dest": f"/etc/systemd/system/{FIREWALL_UNIT}",
                                  "mode": "0644"}},
        {"name": "the node's Quadlet units",
         "ansible.builtin.copy": {"src": "units/{{ inventory_hostname }}/", "dest": f"{QUADLET_DIR}/",
                                  "mode": "0644"},
         "register": "builder_units_placed"},
        {"name": "systemd reads the units (Quadlet's generator makes their services)",
         "ansible.builtin.systemd_service": {"daemon_reload": True}},
        {"name": "the firewall loaded",
         "ansible.builtin.systemd_service": {"name": FIREWALL_UNIT, "enabled": True,
                                             "state": started % "builder_rules"}},
        {"name": "the units started (Quadlet's units start at boot by their [Install] section)",
         "ansible.builtin.systemd_service": {"name": "{{ item }}", "state": started % "builder_units_placed"},
         "loop": "{{ builder_units }}"},
    ]
    return [{"name": f"builder: the services of {source} on the nodes builder does not boot",
             "hosts": "builder_nodes", "become": True, "gather_facts": False, "tasks": tasks}]


def export_ansible(loaded: Loaded, models: Models, quadlet: Export) -> Export:
    """The folder's files, in memory: `quadlet` is `export_quadlet`'s units for the same file and models."""
    where = display_path(loaded.path)
    cluster = loaded.cluster
    if cluster.control is None:
        raise RecipeError(f"{where}: control: the playbook fetches the models from the control node, and none is "
                          "declared", "control: {address: 10.0.0.1, http_port: 8000} (where `builder pxe serve` runs)")
    name = loaded.path.name
    source = name if _SOURCE.fullmatch(name) else "cluster.yaml"
    base = base_url(cluster.control)
    by_node: dict[str, list[str]] = {}
    for key in quadlet.files:
        owner, unit = key.split("/", 1)
        by_node.setdefault(owner, []).append(unit)
    hosts = [n for n in cluster.nodes if n.mac is None and n.name in by_node]
    names = {h.name for h in hosts}
    warnings = list(quadlet.warnings)
    if not hosts:
        raise RecipeError(f"{where}: no node without a mac: runs a unit, and the playbook is for those (netbooted "
                          "nodes follow the plans `builder pxe publish` writes)",
                          "--format quadlet writes the units of every node")
    booted = sorted(n for n in by_node if n not in names)
    if booted:
        warnings.append(f"{', '.join(booted)}: netbooted (mac:), left out of the playbook: `builder pxe publish` "
                        "gives them their plans")
    for node in hosts:
        if node.address is None:
            i = cluster.nodes.index(node)
            raise RecipeError(f"{where}: nodes[{i}].address: the playbook reaches {node.name} over ssh at its "
                              "address, and none is given", "write the box's IP address (or host name) here")
    rules = {f.node: f for f in for_services(loaded, leased=True)}  # a netbooted node may lease its address
    files: dict[str, str] = {}
    fetched: dict[str, str] = {}  # sha256 -> the model the control node serves under it
    groups: dict[str, dict[str, Any]] = {}
    taken: dict[str, str] = {}
    for node in hosts:
        for unit in by_node[node.name]:
            files[f"units/{node.name}/{unit}"] = quadlet.files[f"{node.name}/{unit}"]
        files[f"firewall/{node.name}.nft"] = ruleset(rules[node.name], source)
        mine = [p for p in loaded.processes if p.node == node.name]
        units = sorted((u for u in by_node[node.name] if u.endswith(".container")),
                       key=lambda u: (not u.endswith("-rpc.container"), u))
        wanted = []
        for service in map(loaded.service, dict.fromkeys(p.service for p in mine if p.role != "rpc-worker")):
            if is_ray_pipeline(loaded, service):
                continue  # not exported as units (a warning says so)
            if service.ref.folder:
                warnings.append(f"{node.name}: {service.name}'s model is a folder, which the playbook does not "
                                f"fetch: copy it to {service.ref.on_box(models.path)} first (cp -r)")
                continue
            wanted.append({"service": service.name, "sha256": service.sha256,
                           "url": f"{base}/blobs/sha256/{service.sha256}", "dest": service.ref.on_box(models.path)})
            fetched[service.sha256] = service.model
        files[f"host_vars/{node.name}.yml"] = _dump(source, f"what the play puts on {node.name} ({node.address})", {
            "builder_units": [u.removesuffix(".container") + ".service" for u in units],
            "builder_models": wanted})
        for process in mine:
            for group in (group_name("target", process.target or str(node.target), taken),
                          group_name("service", process.service, taken)):
                groups.setdefault(group, {"hosts": {}})["hosts"][node.name] = None
    inventory = {"all": {"children": {
        "builder_nodes": {"hosts": {n.name: {"ansible_host": str(n.address)} for n in hosts}}, **groups}}}
    files["inventory.yml"] = _dump(source, "the nodes without a mac: that run units, at their addresses", inventory)
    files["site.yml"] = _dump(source, "ansible-playbook -i inventory.yml site.yml (ansible-core's own modules only)",
                              playbook(source, models))
    files[FIREWALL_UNIT] = firewall_unit(source)
    steps = [f"# on the control node, `builder pxe serve` (at {base}) serves each model from pxe-root/blobs/sha256/ "
             "under its sha256 (`builder pxe publish` puts the netbooted nodes' ones there); put these there:"]
    steps += [f"#   {model} -> pxe-root/blobs/sha256/{sha}" for sha, model in fetched.items()]
    steps.append("ansible-playbook -i inventory.yml site.yml   # in the folder; over ssh, as a user who may sudo "
                 "(become: true)")
    steps += [s for s in quadlet.steps if s.startswith("# NVIDIA")]
    steps.append("builder cluster up CLUSTER-FILE   # on the control node: the gateway in front of them")
    # an older export's files that this one does not write are removed, whichever of builder's exports wrote them
    return Export(files, tuple(dict.fromkeys(warnings)), tuple(steps),
                  {k: v for k, v in quadlet.images.items() if k.split("/")[0] in names},
                  ("units/*/*", "host_vars/*.yml", "firewall/*.nft"))
