"""Netboot from a cluster file (builder/cluster/model.py): each netbooted node's plan and boot files.

A netbooted node (one with a `mac`) may run several processes: a llama-server per service it serves (a replica,
or the head of a split with `--rpc` to its workers' addresses), a ggml-rpc-server per split it works for, or
a vLLM server or pipeline node. They do not fit a kernel command line (2 KiB on x86, and a service's `args`
may hold spaces), so every node gets a plan (builder/netboot/plan.py: the lines and their one text form): a
small file published as a blob, named on its command line with its sha256, which the node fetches, checks
and follows. Every model is published as a blob too (a GGUF given by URL is fetched onto the control node
first, checked against the service's sha256; a vLLM model folder is checked against its content hash and
packed into a squashfs), so nodes fetch models only from the control node; a node with a cache disk keeps its
models there (builder.models=SHA:SIZE,… tells the initramfs how much room to make).

A node runs one root: the llama.cpp image of its target, or its vLLM image (the netboot set vllm-VARIANT)
when it hosts vLLM services; a node hosting both kinds is refused. A board with several devices boots the
image of the device its services pick; services on two of its devices are refused (docs/design.md says why).
Nodes without a `mac` are not booted by builder: they get no files (`builder cluster commands` prints what to run
on them).
"""

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from builder.cluster.commands import is_ray_pipeline
from builder.cluster.firewall import for_services
from builder.cluster.model import ClusterNode, Loaded, Process, Service, load_cluster
from builder.cluster.vllm_service import MODELS, SOCKET_ENV, launch, node_variant
from builder.core.errors import RecipeError
from builder.netboot import bom
from builder.netboot.firewall import ruleset
from builder.netboot.inventory import GGUF_MAGIC, Control
from builder.netboot.kernels import KERNELS
from builder.netboot.models import pack_model
from builder.netboot.plan import (
    AGENT_PORT,
    NONE,
    AdminKeyLine,
    AgentLine,
    EnvLine,
    Line,
    MemoryLine,
    MetricsLine,
    NodePlan,
    RpcWorkerLine,
    ServerLine,
    SshLine,
    VllmLine,
    serialize,
)
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
from builder.recipe.load import display_path, load_yaml, validated

Say = Callable[[str], None]
KERNEL_LINE = 2047  # COMMAND_LINE_SIZE on x86, less its final NUL
# Names that hold credentials by convention. Every file a netbooted node boots from (its plan included) is
# served to the boot network, where any host can read it: such a value has no place in a node's `env`.
_CREDENTIAL = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|SESSION", re.IGNORECASE)


def control_of(path: Path) -> Control:
    """The control node of a published cluster.yaml (what `pxe serve` needs from it)."""
    control = load_yaml(path, "cluster", "pass the path of your cluster.yaml").get("control")
    if not isinstance(control, dict):
        raise RecipeError(f"{display_path(path)}: control: netbooted nodes fetch their boot files from the control "
                          "node, and none is declared", "control: {address: 10.0.0.1} (this machine's address)")
    return validated(Control, path, control)


def _engines(loaded: Loaded, node: str) -> set[str]:
    return {loaded.service(p.service).engine for p in loaded.processes if p.node == node}


def booted(loaded: Loaded, node: ClusterNode) -> tuple[str | None, str, str]:
    """(device, target, variant) whose image a netbooted node boots: what its processes run (load_for_netboot
    refuses two), or on an idle node its one target or first device. `device` is None on a one-target node."""
    runs = [p for p in loaded.processes if p.node == node.name]
    if runs:
        return runs[0].device, runs[0].target, runs[0].variant
    device = next(iter(node.devices), None)
    return (device, *node_variant(node, device))


def _check_devices(loaded: Loaded, i: int, node: ClusterNode, where: str) -> None:
    """A netbooted node boots one root, the image of one device: its services all run on that device."""
    runs = {(p.device, p.target, p.variant) for p in loaded.processes if p.node == node.name}
    if len(runs) > 1:
        used = ", ".join(f"{d} ({t}/{v})" for d, t, v in sorted(runs, key=str))
        raise RecipeError(f"{where}: nodes[{i}]: {node.name}'s services run on its devices {used}, and a netbooted "
                          "node boots one device's image", "give its services one device:, or leave out mac: and "
                          "start each device's processes with `builder cluster commands`")


def _check_node(loaded: Loaded, i: int, node: ClusterNode, where: str) -> None:
    cluster = loaded.cluster
    _check_devices(loaded, i, node, where)
    device, target, _ = booted(loaded, node)
    if target not in KERNELS:
        field = f"devices.{device}" if device else "target"
        raise RecipeError(f"{where}: nodes[{i}].{field}: {target} cannot be netbooted yet",
                          f"netboot targets: {', '.join(KERNELS)}; leave out mac: to run it yourself "
                          "(`builder cluster commands`)")
    node.board([*cluster.kernel_args, *node.kernel_args], f"{where}: nodes[{i}]")
    for name, value in node.env.items():
        if _CREDENTIAL.search(name):
            raise RecipeError(f"{where}: nodes[{i}].env.{name}: looks like a credential, and a netbooted node's "
                              "plan (its env included) is served to the boot network, where any host can read it",
                              "keep secrets off netbooted nodes (docs/security.md)")
        if value == NONE:
            raise RecipeError(f"{where}: nodes[{i}].env.{name}: '-' means an empty value in a node's plan",
                              "give another value, or '' for an empty one")
    if len(_engines(loaded, node.name)) > 1:
        raise RecipeError(f"{where}: nodes[{i}]: {node.name} hosts llama.cpp and vLLM services, and a netbooted "
                          "node boots one image", "place them on different nodes")


def _check_preseed(loaded: Loaded, i: int, node: ClusterNode, where: str) -> None:
    """A netbooted worker fills its tensor cache from a model kept on its cache disk: in RAM, the model and its
    cached copy would take twice the memory the worker serves from."""
    if loaded.cluster.cache_of(node) is not None:
        return
    for process in loaded.processes:
        if process.node == node.name and process.role == "rpc-worker" and loaded.service(process.service).preseed:
            index = [s.name for s in loaded.cluster.services].index(process.service)
            raise RecipeError(f"{where}: services[{index}].preseed: the worker {node.name} (nodes[{i}]) has no cache "
                              "disk, and a netbooted worker keeps the model it seeds from there",
                              "give the node a cache: (docs/netboot.md), or remove preseed:")


def _needs_address(loaded: Loaded, node: str) -> str | None:
    """Why a netbooted node's address must be in the file (peers, or its vLLM command line, name it)."""
    for process in loaded.processes:
        service = loaded.service(process.service)
        if process.node == node and service.engine == "vllm":
            return "its vLLM server binds that address"
        if node in service.workers and service.head and not loaded.node(node).data_interface:
            return f"the head of {service.name} connects to its workers there"
        if node in service.nodes and service.topology == "pipeline":
            return f"the nodes of the pipeline {service.name} reach each other there"
    return None


def load_for_netboot(path: Path) -> Loaded:
    """A cluster file checked for netboot: a control node, netbootable targets for the nodes with a `mac`,
    an address where peers need one, GGUF files and model folders only."""
    loaded = load_cluster(path)
    where = display_path(path)
    cluster = loaded.cluster
    if cluster.control is None:
        raise RecipeError(f"{where}: control: netbooted nodes fetch their boot files from the control node, and "
                          "none is declared", "control: {address: 10.0.0.1} (the node that runs `builder pxe serve`)")
    if not cluster.netbooted:
        raise RecipeError(f"{where}: nodes: no node has a mac:, so builder boots none of them",
                          "give the nodes to netboot their mac:; `builder cluster commands` prints what to run on "
                          "the others")
    booted = {node.name for node in cluster.netbooted}
    for i, node in enumerate(cluster.nodes):
        if node.name not in booted:
            continue
        _check_node(loaded, i, node, where)
        if node.name in loaded.agent_hosts() and any(p.port == AGENT_PORT for p in loaded.processes
                                                    if p.node == node.name):
            raise RecipeError(f"{where}: services: a service on {node.name} uses port {AGENT_PORT}, where the node's "
                              "gateway agent listens", f"give the service another port than {AGENT_PORT}")
        _check_preseed(loaded, i, node, where)
        for field, port in ((f, getattr(cluster.admins, f)) for f in ("ssh_port", "metrics_port") if cluster.admins):
            if port == AGENT_PORT:
                raise RecipeError(f"{where}: admins.{field}: {AGENT_PORT} is where {node.name}'s gateway agent "
                                  "listens", f"give it another port (default {22 if field == 'ssh_port' else 9100})")
        why = _needs_address(loaded, node.name)
        if why and not node.address:
            raise RecipeError(f"{where}: nodes[{i}].address: {node.name} needs one: {why}",
                              "reserve an address for the node in your DHCP server and write it here")
    for i, service in enumerate(cluster.services):
        hosts = {p.node for p in loaded.processes if p.service == service.name} & booted
        if not hosts:
            continue
        for j, arg in enumerate(service.args):
            if not arg.strip():
                raise RecipeError(f"{where}: services[{i}].args[{j}]: an empty argument does not reach a "
                                  "netbooted node", "remove it")
        if service.engine == "vllm":
            for name in service.nodes:
                if not loaded.node(name).address:
                    raise RecipeError(f"{where}: nodes[{[n.name for n in cluster.nodes].index(name)}].address: "
                                      f"{name} needs one: the vLLM command lines of {service.name} name it",
                                      "reserve an address for the node in your DHCP server and write it here")
            if is_ray_pipeline(loaded, service):
                raise RecipeError(f"{where}: services[{i}]: a Ray pipeline does not netboot yet (its nodes would "
                                  "need the cluster's Ray token)", "run it with `builder cluster up --local`, "
                                  "or on nodes builder does not boot")
            continue
        model = service.ref.path(loaded.path.parent)
        if model is not None and service.model:
            # The file is published over HTTP to the nodes: only a model, never any other file of this machine.
            with model.open("rb") as f:
                if f.read(4) != GGUF_MAGIC:
                    raise RecipeError(f"{where}: services[{i}].model: {service.model} is not a GGUF file",
                                      "give a .gguf model file; nothing else is published to the nodes")
    for_services(loaded, leased=True)  # every address the firewall names: one line now, before any build
    return loaded


def _has_model(loaded: Loaded, process: Process) -> bool:
    """Whether the process gets its service's model: a server, or an RPC worker of a service with preseed."""
    return process.role != "rpc-worker" or loaded.service(process.service).preseed


def _netbooted_services(loaded: Loaded) -> list[tuple[int, Service]]:
    """The services with a server, or a preseeding RPC worker, on a netbooted node (their model is published)."""
    booted = {node.name for node in loaded.cluster.netbooted}
    served = {p.service for p in loaded.processes if p.node in booted and _has_model(loaded, p)}
    return [(i, s) for i, s in enumerate(loaded.cluster.services) if s.name in served]


def models(loaded: Loaded, say: Say) -> dict[str, Path]:
    """What each netbooted service publishes: its GGUF (a URL fetched into the cache), or the squashfs of its
    model folder; each checked against the service's sha256 first."""
    out: dict[str, Path] = {}
    for i, service in _netbooted_services(loaded):
        path = loaded.local_model(i, say)
        out[service.name] = pack_model(path) if service.engine == "vllm" else path
    return out


def netboot_set(loaded: Loaded, node: ClusterNode) -> tuple[str, str]:
    """(target, variant) of the netboot set a node boots (booted()): its vLLM image's is spelt vllm-VARIANT."""
    _, target, variant = booted(loaded, node)
    return target, f"vllm-{variant}" if "vllm" in _engines(loaded, node.name) else variant


def _vllm_line(loaded: Loaded, process: Process, url: str, blob: str) -> VllmLine:
    service, node = loaded.service(process.service), loaded.node(process.node)
    addresses = {n.name: str(n.address) for n in loaded.cluster.nodes if n.address}
    peers = {n.name: str(n.peer_address) for n in loaded.cluster.nodes if n.peer_address}
    mount = f"{MODELS}/{service.name}"
    started = launch(service, process, node, Path(mount), addresses, "-", None, peers=peers)
    # SOCKET_ENV are left to the node's process units: they set them from the interface it leased its address on
    flags = zip(started.flags[::2], started.flags[1::2], strict=True)
    pairs = (value.partition("=") for flag, value in flags if flag == "--env")
    env = tuple((name, setting) for name, _, setting in pairs if name not in SOCKET_ENV)
    port = process.port if process.role == "server" else None
    return VllmLine(service.name, port, url, blob, mount, env, tuple(started.argv))


def node_plan(loaded: Loaded, node: str, base: str, blobs: dict[str, str]) -> NodePlan:
    """A node's plan: its environment, its RPC workers first (heads elsewhere wait for them), then its servers.
    `blobs`: each service's published model, by sha256."""
    lines: list[Line] = [EnvLine(name, value) for name, value in sorted(loaded.node(node).env.items())]
    if node in loaded.agent_hosts():
        lines.append(AgentLine(AGENT_PORT))
    admins = loaded.cluster.admins
    if admins is not None:
        lines += [AdminKeyLine(kind, blob) for kind, blob in admins.key_blobs]
        lines += [SshLine(admins.ssh_port), MetricsLine(admins.metrics_port)]
    mine = sorted((p for p in loaded.processes if p.node == node), key=lambda p: p.role != "rpc-worker")
    for name in dict.fromkeys(p.service for p in mine):  # a service's memory: bounds each of its processes
        memory = loaded.service(name).memory
        if memory is not None:
            lines.append(MemoryLine(name, int(memory)))
    where = {n.name: str(n.peer_address) for n in loaded.cluster.nodes}  # a worker's data address, if it has one
    for process in mine:
        service = loaded.service(process.service)
        url = f"{base}/blobs/sha256/{blobs[service.name]}" if service.name in blobs else ""
        if process.role == "rpc-worker":
            seed = (url, service.sha256) if service.preseed else ()
            lines.append(RpcWorkerLine(service.name, process.port, *seed))
            continue
        if service.engine == "vllm":
            lines.append(_vllm_line(loaded, process, url, blobs[service.name]))
            continue
        rpc = tuple(f"{where[w]}:{service.rpc_port}" for w in service.workers)
        lines.append(ServerLine(service.name, process.port, url, service.sha256, rpc, service.context,
                                tuple(service.args)))
    return NodePlan(node, tuple(lines))


def label(loaded: Loaded, node: str) -> str:
    """What the node runs, for its script's echo line: 'server chat, rpc-worker big'."""
    mine = [f"{p.role} {p.service}" for p in loaded.processes if p.node == node]
    return ", ".join(mine) or "no services"


def node_files(root: Path, loaded: Loaded, files: dict[str, Path], manifests: Manifests
               ) -> tuple[dict[str, bytes], dict[str, object]]:
    """Every netbooted node's script, plan and firewall rules (under nodes/), and nodes.json's entries."""
    cluster = loaded.cluster
    assert cluster.control is not None
    base = base_url(cluster.control)
    blobs = {s.name: add_blob(root, files[s.name], s.sha256 if s.engine == "llama.cpp" else None)
             for _, s in _netbooted_services(loaded)}
    firewalls = {f.node: f for f in for_services(loaded, leased=True)}
    out: dict[str, bytes] = {}
    nodes: dict[str, object] = {}
    listed: dict[str, dict[str, object]] = {}  # bom.json's nodes
    for node in cluster.netbooted:
        key = "-".join(netboot_set(loaded, node))
        manifest = manifests[key]
        ssh = manifest.get("ssh")
        if cluster.admins is not None and not (isinstance(ssh, dict) and ssh.get("suite")):
            why = ssh.get("missing") if isinstance(ssh, dict) else "it was made before builder added one"
            raise RecipeError(f"{display_path(loaded.path)}: admins: {node.name} boots the netboot set {key}, which "
                              f"has no ssh server ({why})", "make the set again with `builder pxe build`, or leave "
                              "out admins: (docs/clusters.md)")
        rules = ruleset(firewalls[node.name], "cluster.yaml").encode()
        plan = serialize(node_plan(loaded, node.name, base, blobs)).encode()
        plan_sha256, rules_sha256 = add_blob_bytes(root, plan), add_blob_bytes(root, rules)
        args = root_words(base, node, manifest, [f"builder.plan={base}/blobs/sha256/{plan_sha256}",
                                                 f"builder.plan_sha256={plan_sha256}"],
                          rules_sha256, cluster.cache_of(node), cluster.ram_share)
        mine = {p.service for p in loaded.processes if p.node == node.name and _has_model(loaded, p)}
        served = [s.name for s in cluster.services if s.name in mine]
        if served:
            # the initramfs makes room on the cache disk for these (a node without one ignores the word)
            args.append("builder.models=" + ",".join(f"{blobs[s]}:{files[s].stat().st_size}" for s in served))
        # the file's words, what the board needs (derived from its facts), then the node's own words
        board = node.board([*cluster.kernel_args, *node.kernel_args], node.name)
        args += [*cluster.kernel_args, *board.words, *node.kernel_args]
        if len(" ".join(args)) > KERNEL_LINE:
            raise RecipeError(f"{display_path(loaded.path)}: nodes: {node.name}'s kernel command line would be "
                              f"{len(' '.join(args))} bytes, above the kernel's {KERNEL_LINE}",
                              "place fewer services on the node, or shorten its kernel_args")
        out[f"nodes/{node.file_stem}.nft"] = rules
        out[f"nodes/{node.file_stem}.plan"] = plan
        script = ipxe_script(base, node, manifest, label(loaded, node.name), f"image {manifest['image_digest']}",
                             args).encode()
        out[f"nodes/{node.file_stem}.ipxe"] = script
        processes = [{"service": p.service, "role": p.role, "port": p.port}
                     for p in loaded.processes if p.node == node.name]
        nodes[node.name] = {"mac": node.mac, "artifacts": key, "processes": processes}
        listed[node.name] = {"mac": node.mac, "set": key, "script_sha256": hashlib.sha256(script).hexdigest(),
                             "plan_sha256": plan_sha256, "firewall_sha256": rules_sha256, "processes": processes}
    out[bom.BOM] = _bill(loaded, blobs, manifests, listed)
    return out, nodes


def _bill(loaded: Loaded, blobs: dict[str, str], manifests: Manifests, nodes: dict[str, dict[str, object]]) -> bytes:
    """bom.json: the generation's sets, models (by sha256, with where they came from) and nodes. The gateway's
    HAProxy config is rendered by `builder cluster up`, not here: its settings' sha256 is what publish knows."""
    base = loaded.path.parent
    models: dict[str, dict[str, object]] = {}
    for _, service in _netbooted_services(loaded):
        models[service.name] = {"engine": service.engine, "sha256": service.sha256 or blobs[service.name],
                                "blob_sha256": blobs[service.name],
                                "source": bom.model_source(service.model, base),
                                "revision": bom.model_revision(service.model)}
    return bom.render(loaded.path.read_bytes(), loaded.cluster.gateway.model_dump(mode="json"),
                      {key: bom.set_entry(m, key) for key, m in manifests.items()}, models, nodes)


def publish_services(root: Path, loaded: Loaded, files: dict[str, Path], artifacts: Artifacts, keep: int
                     ) -> tuple[str, bool]:
    """Write a generation for a cluster file (`files`: its models, from models()) and make it current;
    returns (id, whether it is new)."""
    assert loaded.cluster.control is not None
    return publish_generation(root, loaded.cluster.control, loaded.path, artifacts, keep,
                              lambda manifests: node_files(root, loaded, files, manifests))


def summary(loaded: Loaded) -> list[str]:
    """One line per node for `pxe publish`'s output; a node builder does not boot says where its commands are."""
    lines = []
    for n in loaded.cluster.nodes:
        if n.mac is None:
            lines.append(f"  {n.name:<12} {'not netbooted':<17}  {label(loaded, n.name)}  {', '.join(n.targets)}  "
                         f"`builder cluster commands {display_path(loaded.path)}` prints what to run there")
        else:
            device, target, _ = booted(loaded, n)
            lines.append(f"  {n.name:<12} {n.mac}  {label(loaded, n.name)}  {target}{f' ({device})' if device else ''}"
                         f"  nodes/{n.file_stem}.ipxe")
    return lines
