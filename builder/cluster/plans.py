"""Netboot for the services form of cluster.yaml (builder/cluster/model.py): each node's processes.

A node of this form may run several processes: a llama-server per service it serves (a replica, or the head of
a split with `--rpc` to its workers' addresses) and a ggml-rpc-server per split it works for. They do not fit a
kernel command line (2 KiB on x86, and a service's `args` may hold spaces), so each node gets a plan: a small
text file published as a blob, named on its command line with its sha256, which node-init fetches, checks and
follows. Every service's GGUF is published as a blob too (a URL is fetched onto the control node first, checked
against the service's sha256), so nodes fetch models only from the control node; a node with a cache disk
keeps its models there (builder.models=SHA:SIZE,… tells the initramfs how much room to make).

The plan, one process a line, fields separated by tabs, `-` for none:

    server      SERVICE  PORT  MODEL_URL  MODEL_SHA256  RPC  CTX  [LLAMA-SERVER ARGS…]
    rpc-worker  SERVICE  PORT
"""

import re
from collections.abc import Callable
from pathlib import Path

from builder.cluster.firewall import for_services
from builder.cluster.model import Loaded, Process, Service, load_cluster
from builder.core.errors import RecipeError
from builder.netboot.boards import board_args
from builder.netboot.firewall import ruleset
from builder.netboot.inventory import GGUF_MAGIC, Control, load_inventory
from builder.netboot.kernels import KERNELS
from builder.netboot.publish import (
    Artifacts,
    Manifests,
    add_blob,
    add_blob_bytes,
    base_url,
    ipxe_script,
    publish_generation,
    root_words,
)
from builder.recipe.load import display_path, load_yaml, select, validated

Say = Callable[[str], None]
KERNEL_LINE = 2047  # COMMAND_LINE_SIZE on x86, less its final NUL
PLAN_HEADER = ("# fields, tab-separated, '-' for none: env NAME VALUE | server SERVICE PORT MODEL_URL MODEL_SHA256 RPC "
               "CTX [ARGS...] | rpc-worker SERVICE PORT\n")
# Names that hold credentials by convention. Every file a netbooted node boots from (its plan included) is
# served to the boot network, where any host can read it: such a value has no place in a node's `env`.
_CREDENTIAL = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|SESSION", re.IGNORECASE)


def is_services_form(path: Path) -> bool:
    return "services" in load_yaml(path, "cluster", "pass the path of your cluster.yaml")


def control_of(path: Path) -> Control:
    """The control node of a published cluster.yaml of either form (what `pxe serve` needs from it)."""
    data = load_yaml(path, "cluster", "pass the path of your cluster.yaml")
    if "services" not in data:
        return load_inventory(path).control
    control = data.get("control")
    if not isinstance(control, dict):
        raise RecipeError(f"{display_path(path)}: control: netbooted nodes fetch their boot files from the control "
                          "node, and none is declared", "control: {address: 10.0.0.1} (this machine's address)")
    return validated(Control, path, control)


def load_for_netboot(path: Path) -> Loaded:
    """A services-form cluster.yaml checked for netboot: a control node, netbootable targets, every node's address
    (peers and the gateway reach it there; its firewall names it) and GGUF models only."""
    loaded = load_cluster(path)
    where = display_path(path)
    cluster = loaded.cluster
    if cluster.control is None:
        raise RecipeError(f"{where}: control: netbooted nodes fetch their boot files from the control node, and "
                          "none is declared", "control: {address: 10.0.0.1} (the node that runs `builder pxe serve`)")
    for i, node in enumerate(cluster.nodes):
        if node.target not in KERNELS:
            raise RecipeError(f"{where}: nodes[{i}].target: {node.target} cannot be netbooted yet",
                              f"netboot targets: {', '.join(KERNELS)}")
        board_args(node.target, node.ram, [*cluster.kernel_args, *node.kernel_args], f"{where}: nodes[{i}]")
        for name in node.env:
            if _CREDENTIAL.search(name):
                raise RecipeError(f"{where}: nodes[{i}].env.{name}: looks like a credential, and a netbooted node's "
                                  "plan (its env included) is served to the boot network, where any host can read it",
                                  "keep secrets off netbooted nodes (docs/security.md)")
    for i, service in enumerate(cluster.services):
        if service.engine != "llama.cpp":
            raise RecipeError(f"{where}: services[{i}].engine: {service.engine} services do not netboot yet",
                              "netbooted nodes serve llama.cpp services (a GGUF); try it with --local")
        for j, arg in enumerate(service.args):
            if not arg.strip():
                raise RecipeError(f"{where}: services[{i}].args[{j}]: an empty argument does not reach a "
                                  "netbooted node", "remove it")
        model = loaded.model_file(service)
        if model is not None:
            # The file is published over HTTP to the nodes: only a model, never any other file of this machine.
            with model.open("rb") as f:
                if f.read(4) != GGUF_MAGIC:
                    raise RecipeError(f"{where}: services[{i}].model: {service.model} is not a GGUF file",
                                      "give a .gguf model file; nothing else is published to the nodes")
    for_services(loaded)  # every node's address, as the firewall needs it: one line now, before any build
    return loaded


def models(loaded: Loaded, say: Say) -> dict[str, Path]:
    """Every service's GGUF on this machine (a URL fetched into the cache), checked against its sha256."""
    out: dict[str, Path] = {}
    for i, service in enumerate(loaded.cluster.services):
        out[service.name] = loaded.gguf(i, say)
    return out


def addresses(loaded: Loaded) -> dict[str, str]:
    """Where peers and the gateway reach each node (its `address`; load_for_netboot made sure there is one)."""
    return {node.name: str(node.address) for node in loaded.cluster.nodes}


def plan_line(loaded: Loaded, process: Process, model_url: str) -> str:
    """One process of a node's plan (see the module's docstring)."""
    service = loaded.service(process.service)
    if process.role == "rpc-worker":
        fields = ["rpc-worker", service.name, str(process.port)]
    else:
        where = addresses(loaded)
        rpc = ",".join(f"{where[w]}:{service.rpc_port}" for w in service.workers) or "-"
        fields = ["server", service.name, str(process.port), model_url, service.sha256, rpc,
                  str(service.context or "-"), *service.args]
    return "\t".join(fields) + "\n"


def node_plan(loaded: Loaded, node: str, base: str) -> str:
    """A node's plan: its RPC workers first (heads elsewhere wait for them), then its servers."""
    mine = sorted((p for p in loaded.processes if p.node == node), key=lambda p: p.role != "rpc-worker")
    lines = [f"# builder node plan for {node}, from cluster.yaml: regenerate it, do not edit.\n", PLAN_HEADER]
    # the node's environment first: every process the node starts gets it (names and values were checked)
    lines += [f"env\t{name}\t{value}\n" for name, value in sorted(loaded.node(node).env.items())]
    for process in mine:
        url = f"{base}/blobs/sha256/{loaded.service(process.service).sha256}"
        lines.append(plan_line(loaded, process, url))
    return "".join(lines)


def label(loaded: Loaded, node: str) -> str:
    """What the node boots as, for its script's echo line: 'server chat, rpc-worker big'."""
    mine = [f"{p.role} {p.service}" for p in loaded.processes if p.node == node]
    return ", ".join(mine) or "no services"


def _services_of(loaded: Loaded, node: str) -> list[Service]:
    names = {p.service for p in loaded.processes if p.node == node and p.role == "server"}
    return [s for s in loaded.cluster.services if s.name in names]


def node_files(root: Path, loaded: Loaded, files: dict[str, Path], manifests: Manifests
               ) -> tuple[dict[str, bytes], dict[str, object]]:
    """Every node's script, plan and firewall rules (under nodes/), and nodes.json's entries."""
    cluster = loaded.cluster
    assert cluster.control is not None
    base = base_url(cluster.control)
    for service in cluster.services:
        add_blob(root, files[service.name], service.sha256)
    firewalls = {f.node: f for f in for_services(loaded)}
    out: dict[str, bytes] = {}
    nodes: dict[str, object] = {}
    for node in cluster.nodes:
        key = f"{node.target}-{select(node.target, node.variant)[1].name}"
        manifest = manifests[key]
        rules = ruleset(firewalls[node.name], "cluster.yaml").encode()
        plan = node_plan(loaded, node.name, base).encode()
        plan_sha256 = add_blob_bytes(root, plan)
        args = root_words(base, node, manifest, [f"builder.plan={base}/blobs/sha256/{plan_sha256}",
                                                 f"builder.plan_sha256={plan_sha256}"],
                          add_blob_bytes(root, rules), cluster.cache_of(node), cluster.ram_share)
        served = _services_of(loaded, node.name)
        if served:
            # the initramfs makes room on the cache disk for these (a node without one ignores the word)
            args.append("builder.models=" + ",".join(f"{s.sha256}:{files[s.name].stat().st_size}" for s in served))
        # the file's words, what the board needs (derived from its facts), then the node's own words
        board = board_args(node.target, node.ram, [*cluster.kernel_args, *node.kernel_args], node.name)
        args += [*cluster.kernel_args, *board.words, *node.kernel_args]
        if len(" ".join(args)) > KERNEL_LINE:
            raise RecipeError(f"{display_path(loaded.path)}: nodes: {node.name}'s kernel command line would be "
                              f"{len(' '.join(args))} bytes, above the kernel's {KERNEL_LINE}",
                              "place fewer services on the node, or shorten its kernel_args")
        out[f"nodes/{node.file_stem}.nft"] = rules
        out[f"nodes/{node.file_stem}.plan"] = plan
        out[f"nodes/{node.file_stem}.ipxe"] = ipxe_script(base, node, manifest, label(loaded, node.name),
                                                          f"image {manifest['image_digest']}", args).encode()
        nodes[node.name] = {"mac": node.mac, "artifacts": key, "processes": [
            {"service": p.service, "role": p.role, "port": p.port} for p in loaded.processes if p.node == node.name]}
    return out, nodes


def publish_services(root: Path, loaded: Loaded, files: dict[str, Path], artifacts: Artifacts, keep: int
                     ) -> tuple[str, bool]:
    """Write a generation for a services-form cluster file (`files`: its models, from models()) and make it
    current; returns (id, whether it is new)."""
    assert loaded.cluster.control is not None
    return publish_generation(root, loaded.cluster.control, loaded.path, artifacts, keep,
                              lambda manifests: node_files(root, loaded, files, manifests))


def summary(loaded: Loaded) -> list[str]:
    """One line per node for `pxe publish`'s output."""
    return [f"  {n.name:<12} {n.mac}  {label(loaded, n.name)}  {n.target}  nodes/{n.file_stem}.ipxe"
            for n in loaded.cluster.nodes]
