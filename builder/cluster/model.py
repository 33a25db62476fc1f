"""cluster.yaml: nodes (hardware) and services (a model served under one name, with a topology).

This is builder's one cluster model. A node with a `mac` is netbooted (builder/cluster/plans.py), one without
is a box builder does not boot (`builder cluster commands` prints what to run there). A file in the older
netboot-only form (nodes with roles, one top-level `model`) is converted on load (builder/cluster/convert.py),
with a note saying so.
"""

import hashlib
import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as attribute
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import ByteSize, Field

from builder.cluster.admins import Admins
from builder.cluster.args import check_args, check_env
from builder.cluster.convert import convert, is_old_form, note
from builder.cluster.hfmodel import scan
from builder.cluster.modelref import ModelRef
from builder.cluster.vllm_service import check_vllm_service, node_variant
from builder.core.errors import RecipeError
from builder.core.paths import cache_subdir
from builder.core.types import Address, EnvName, HostName, KernelArg, OneLine, is_wildcard
from builder.netboot.boards import BoardArgs, board_args, check_ram
from builder.netboot.inventory import Cache, Control, Node
from builder.recipe.load import display_path, load_yaml, select, validated
from builder.recipe.models import Strict
from builder.recipe.targets import did_you_mean

# A service name reaches HAProxy's config, JSON answers and container names: keep it to plain characters.
SERVICE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SERVER_PORTS = range(8100, 9000)  # where a service's server port is derived from its name
RPC_PORT = 50052
PIPELINE_PORT = 29500
# Upstream reports deadlocks with more than two RPC workers behind one head.
MAX_QUIET_WORKERS = 2
# Weights plus room for the KV cache and compute buffers, when a service does not say what it needs.
MEMORY_FACTOR = 1.2
GIB = 1 << 30
Role = Literal["server", "rpc-worker", "pipeline-worker"]


class Device(Strict):
    """One accelerator of a board that has several (a Core Ultra's iGPU and NPU): the image its processes run."""

    target: str = Field(description="target of this device's image (see `builder targets`)")
    variant: str | None = Field(None, description="variant of the target (default: the target's default)")


class ClusterNode(Node):
    """A node of the services form: its hardware facts; its roles come from the services placed on it."""

    target: str | None = Field(None, description="target whose image the node runs (see `builder targets`); a "
                               "board with several accelerators lists devices: instead")
    variant: str | None = Field(None, description="variant of the target (default: the target's default)")
    devices: dict[HostName, Device] = Field(
        default_factory=dict, description="a board with several accelerators, instead of target: each device by "
        "name, e.g. {igpu: {target: intel-arc, variant: vulkan}, npu: {target: intel-npu}}; a service picks one "
        "with device: and its processes run that device's image")
    memory: ByteSize | None = Field(None, description="memory its models may use, e.g. 64GiB (needed to host one)")
    ram: ByteSize | None = Field(None, description="the RAM the board has, in GiB, e.g. 128GiB; netbooted "
                                 "strix-halo nodes need it (their iGPU's share of it goes on the kernel command line)")
    env: dict[EnvName, OneLine] = Field(
        default_factory=dict, description="environment of the node's servers and workers, e.g. "
        "GGML_VK_VISIBLE_DEVICES: '0' to use a software Vulkan device (device and thread variables only)")
    unsafe_env: bool = Field(False, description="let env names outside builder's list through (one warning line "
                             "names them): they can undo builder's bindings")

    def pick(self, device: str | None) -> Device:
        """What a service's processes run on this node: the device the service picks, or the node's one target
        (which a service's pick leaves alone). Only for a checked file (load_cluster)."""
        if self.devices:
            assert device in self.devices, (self.name, device)
            return self.devices[device]
        assert self.target is not None, self.name
        return Device(target=self.target, variant=self.variant)

    @property
    def targets(self) -> list[str]:
        """The targets of the board's accelerators, each once, in the file's order."""
        if not self.devices:
            return [self.target] if self.target else []
        return list(dict.fromkeys(d.target for d in self.devices.values()))

    @property
    def devices_json(self) -> dict[str, dict[str, str | None]]:
        """Its devices as `cluster status --json` gives them ({} for a node with one target)."""
        return {name: device.model_dump() for name, device in self.devices.items()}

    def board(self, given: list[str], where: str) -> BoardArgs:
        """The kernel words the board needs (its RAM shared with an iGPU), whichever device's image it runs."""
        found = [board_args(target, None if self.ram is None else int(self.ram), given, where)
                 for target in self.targets]
        mappable = [b.gpu_memory for b in found if b.gpu_memory is not None]
        words = list(dict.fromkeys(w for b in found for w in b.words))
        return BoardArgs(tuple(words), min(mappable) if mappable else None)


class Gateway(Strict):
    """The one OpenAI-compatible endpoint in front of every service (HAProxy on the control node)."""

    port: int = Field(8080, ge=1, le=65535, description="port users and agents connect to")
    address: Address | None = Field(
        None, description="netbooted nodes: the address users connect to (default: control.address)")
    metrics_port: int = Field(8405, ge=1, le=65535, description="Prometheus metrics and stats, on loopback only")
    key_file: OneLine | None = Field(None, description="file holding the API key (default: one generated by builder)")
    max_request: ByteSize = Field(
        ByteSize(1 << 20), ge=16 << 10, le=64 << 20,
        description="largest request body (HAProxy's buffer: the whole body is read to route by model); "
        "each HAProxy buffer costs CPU in proportion to this size (docs/benchmarks.md)")


class Service(Strict):
    """One model served under one name."""

    name: str = Field(pattern=SERVICE_NAME, description="the name clients send as `model`")
    engine: Literal["llama.cpp", "vllm"] = Field("llama.cpp", description="what serves it")
    device: HostName | None = Field(None, description="on nodes that list devices:, the one its processes use "
                                    "(e.g. npu); nodes with one target run that")
    model: OneLine = Field("", description="llama.cpp: the GGUF, a path (relative to this file), an http(s) URL or "
                           "hf://ORG/REPO@REVISION/FILE.gguf; vllm: a Hugging Face model folder, a path relative to "
                           "this file or hf://ORG/REPO@REVISION (hf:// names are locked in cluster.lock by "
                           "`builder lock FILE`); a split without head: may leave it out")
    sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$", description="llama.cpp: sha256 of the GGUF; vllm: the "
                        "folder's content hash (`builder cluster hash-model DIR`); checked before serving; an hf:// "
                        "model may leave it out (cluster.lock carries it)")
    memory: ByteSize | None = Field(None, description="memory the model needs (default: 1.2 × its files' size)")
    topology: Literal["replicate", "split", "pipeline"] = Field(
        "replicate", description="replicate: a server per node; split: a head plus RPC workers (llama.cpp); "
        "pipeline: one vLLM over the nodes, in order (vllm)")
    nodes: list[str] = Field(default_factory=list, description="replicate: the nodes that each run a server; "
                             "pipeline: the nodes the layers are spread over, the first one serving")
    head: str | None = Field(None, min_length=1, description="split: the node running llama-server; leave it out "
                             "for workers only (the head runs outside this file)")
    workers: list[str] = Field(default_factory=list, description="split: the nodes running ggml-rpc-server")
    port: int | None = Field(None, ge=1, le=65535, description="the server's port (default: derived from the "
                             "service's name, 8100-8999, so it never moves when other services change)")
    rpc_port: int = Field(RPC_PORT, ge=1, le=65535, description="split: the workers' port")
    preseed: bool = Field(False, description="split: give each RPC worker the model too; it fills its tensor "
                          "cache from it before it listens, so the head's first load sends hashes instead of the "
                          "large tensors (docs/clusters.md says when that pays)")
    pipeline_port: int = Field(PIPELINE_PORT, ge=1, le=65535, description="pipeline: the port on the first node "
                               "the others join (Ray's head, or torch.distributed's master on cpu)")
    context: int | None = Field(None, ge=64, description="context size (llama.cpp -c, vLLM --max-model-len)")
    args: list[OneLine] = Field(default_factory=list, description="extra llama-server or vllm serve arguments "
                                "(tuning flags only, docs/clusters.md)")
    unsafe_args: bool = Field(False, description="let args outside builder's list of tuning flags through (one "
                              "warning line names them): they can undo builder's bindings")

    @property
    def ref(self) -> ModelRef:
        """The model with its sha256: a GGUF (llama.cpp) or a model folder (vllm)."""
        return ModelRef(self.model, self.sha256, folder=self.engine == "vllm")


class ServiceCluster(Strict):
    """The services form of cluster.yaml."""

    SCHEMA_COMMAND: ClassVar[str] = "builder cluster schema"

    control: Control | None = None
    gateway: Gateway = Field(default_factory=lambda: Gateway.model_validate({}))
    kernel_args: list[KernelArg] = Field(default_factory=lambda: ["console=tty0", "console=ttyS0,115200"],
                                   description="kernel command-line words for every node")
    cache: Cache | None = Field(None, description="netbooted nodes: every node's cache disk (a node's own "
                                "`cache` wins); without one a node holds its root in RAM")
    ram_share: int = Field(50, ge=1, le=100, description="netbooted nodes: a node in RAM mode warns when its root "
                           "is larger than this percentage of its memory")
    admins: Admins | None = Field(None, description="operators: SSH public keys that may log in to the "
                                  "netbooted nodes, the addresses they connect from, the ssh port (docs/clusters.md)")
    nodes: list[ClusterNode] = Field(min_length=1)
    services: list[Service] = Field(min_length=1)

    def cache_of(self, node: Node) -> Cache | None:
        return None if node.cache is False else node.cache or self.cache

    @property
    def netbooted(self) -> list[ClusterNode]:
        """The nodes builder boots: those with a `mac`."""
        return [node for node in self.nodes if node.mac is not None]


@dataclass(frozen=True)
class Process:
    """One server or RPC worker that a service runs on a node."""

    service: str
    node: str
    role: Role
    port: int
    # What it runs: the device the service picked on the node (None: the node's one target), that device's
    # target and variant (its default filled in). Derived from the service and node, so left out of equality.
    device: str | None = attribute(default=None, compare=False)
    target: str = attribute(default="", compare=False)
    variant: str = attribute(default="", compare=False)


@dataclass(frozen=True)
class Loaded:
    """A checked cluster file, what runs where, and warnings worth printing."""

    path: Path
    cluster: ServiceCluster
    processes: tuple[Process, ...]
    warnings: tuple[str, ...]
    notes: tuple[str, ...] = ()  # e.g. that the file was converted from the netboot-only form

    def local_model(self, index: int, say: Callable[[str], None], where: str | None = None) -> Path:
        """services[index]'s GGUF or model folder on this machine (a URL fetched into the cache), checked against
        its sha256; `where` names the file in a refusal (default: its path as given)."""
        return self.cluster.services[index].ref.local(self.path.parent, where or display_path(self.path),
                                                      f"services[{index}]", say)

    def state_folder(self, kind: str) -> tuple[str, Path]:
        """A name for this cluster file's `kind` of run (e.g. local containers, a netboot gateway), unique per
        file, and the folder where that run keeps its state."""
        stem = re.sub(r"[^a-z0-9-]+", "-", self.path.stem.lower()).strip("-") or "cluster"
        digest = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:8]
        project = f"builder-{kind}{stem}-{digest}"
        return project, cache_subdir(f"clusters/{project}")

    def node(self, name: str) -> ClusterNode:
        return next(n for n in self.cluster.nodes if n.name == name)

    def service(self, name: str) -> Service:
        return next(s for s in self.cluster.services if s.name == name)

    def servers(self, service: str) -> list[Process]:
        return [p for p in self.processes if p.service == service and p.role == "server"]

    def agent_nodes(self) -> set[str]:
        """The netbooted nodes that run a llama-server: each answers the gateway's agent-check (its device is
        there, or not) on the plan's agent port (builder/netboot/plan.py)."""
        booted = {node.name for node in self.cluster.netbooted}
        return {p.node for p in self.processes if p.node in booted and p.role == "server"
                and self.service(p.service).engine == "llama.cpp"}

    def agent_hosts(self) -> set[str]:
        """The netbooted nodes that run the agent: those of agent_nodes(), and with admins: every netbooted node
        (the agent also reports the node's ssh host key to the control node)."""
        if self.cluster.admins is None:
            return self.agent_nodes()
        return {node.name for node in self.cluster.netbooted}


def _gib(size: float) -> str:
    return f"{size / GIB:.1f} GiB"


def server_port(service: Service) -> int:
    """A service's server port: its own `port`, else one derived from its name alone (SERVER_PORTS), so that
    adding, removing or reordering services moves no other service's port (a firewall rule, a bookmark, a
    monitoring target stay right). Two services on one node that land on the same port are one line."""
    if service.port is not None:
        return service.port
    digest = hashlib.sha256(service.name.encode()).digest()
    return SERVER_PORTS.start + int.from_bytes(digest[:4], "big") % len(SERVER_PORTS)


def _check_nodes(cluster: ServiceCluster, where: str) -> dict[str, int]:
    seen: dict[tuple[str, str], int] = {}  # (field, value) → the node that gave it first
    for i, node in enumerate(cluster.nodes):
        for field, shown, fix in (("address", node.address, "every node has its own address"),
                                  ("name", repr(node.name), "give every node its own name"),
                                  ("mac", node.mac, "every node boots from its own network interface")):
            value = getattr(node, field)
            if value and (field, value) in seen:
                raise RecipeError(f"{where}: nodes[{i}].{field}: {shown} is already nodes[{seen[field, value]}]", fix)
            if value:
                seen[field, value] = i
        _check_form(node, f"{where}: nodes[{i}]")
        for target in node.targets if node.ram is not None else []:
            check_ram(int(node.ram or 0), target, f"{where}: nodes[{i}]")
    return {node.name: i for i, node in enumerate(cluster.nodes)}


def _check_form(node: ClusterNode, at: str) -> None:
    """One target (the common case) or several devices, never both; every target and variant known."""
    if node.devices and (node.target or node.variant):
        raise RecipeError(f"{at}: gives both {'target' if node.target else 'variant'}: and devices:; a node has "
                          "one target, or several devices", "keep devices: (each with its target and variant) "
                          "and remove the node's own target: and variant:")
    if not node.devices:
        if node.target is None:
            raise RecipeError(f"{at}.target: required", "target: NAME (see `builder targets`), or devices: for a "
                              "board with several accelerators (docs/clusters.md)")
        select(node.target, node.variant, at)
        return
    for name, device in node.devices.items():
        select(device.target, device.variant, f"{at}.devices.{name}")


def _check_device(service: Service, field: str, where: str, index: dict[str, int], nodes: list[ClusterNode]
                  ) -> None:
    """A service on a node with several devices picks one (device:), which every such node of it has."""
    names = [*service.nodes, *([service.head] if service.head else []), *service.workers]
    several = [nodes[index[name]] for name in names if nodes[index[name]].devices]
    if service.device is None:
        if several:
            node = several[0]
            raise RecipeError(f"{where}: {field}.device: node {node.name} has several devices "
                              f"({', '.join(node.devices)}) and the service does not say which it runs on",
                              f"device: {next(iter(node.devices))} (or another of them)")
        return
    if not several:
        raise RecipeError(f"{where}: {field}.device: {service.device!r} picks one of a node's devices:, and none "
                          "of the service's nodes lists any", "remove device:, or describe the boards with devices:")
    for node in several:
        if service.device not in node.devices:
            raise RecipeError(f"{where}: {field}.device: node {node.name} (nodes[{index[node.name]}]) has no device "
                              f"{service.device!r}{did_you_mean(service.device, node.devices)}",
                              f"its devices: {', '.join(node.devices)}")


def _check_addresses(cluster: ServiceCluster, where: str) -> None:
    """Addresses something binds (the gateway, the nodes' servers and workers, the control node's gateway by
    default) are IP literals, never every address: a name resolves once, when a process starts, perhaps to a
    wildcard, and HAProxy, nftables and the servers read an address each in their own way."""
    fields = [("gateway.address", cluster.gateway.address)]
    fields += [("control.address", cluster.control.address)] if cluster.control else []
    fields += [(f"nodes[{i}].address", node.address) for i, node in enumerate(cluster.nodes)]
    for field, value in fields:
        if value is None:
            continue
        if is_wildcard(value):
            raise RecipeError(f"{where}: {field}: {value} is every address, not one",
                              "give the IP address of the one interface it must listen on")
        if "%" in value:
            raise RecipeError(f"{where}: {field}: {value} has a zone", "give an address without %ZONE")
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise RecipeError(f"{where}: {field}: {value!r} is a name; builder binds and admits IP addresses",
                              "give its IP address (reserve it in your DHCP server)") from None


def _check_data_network(cluster: ServiceCluster, where: str) -> None:
    """Data interfaces: each its own address, never another node's boot address, never the boot interface; a
    split whose workers listen on the data network has a head on it, in the same network (nothing routes there);
    a vLLM pipeline's nodes are all on it, or none."""
    taken = {node.address: node.name for node in cluster.nodes if node.address}  # address → its node
    for i, node in enumerate(cluster.nodes):
        data = node.data_interface
        if data is None:
            continue
        field = f"nodes[{i}].data_interface"
        if data.mac is not None and data.mac == node.mac:
            raise RecipeError(f"{where}: {field}.mac: {data.mac} is {node.name}'s boot interface (its mac:)",
                              "give the MAC (or name:) of its second interface")
        if data.ip in taken:
            raise RecipeError(f"{where}: {field}.address: {data.ip} is already {taken[data.ip]}'s address",
                              "give every node its own address on the data network")
        taken[data.ip] = node.name
    by_name = {node.name: (i, node) for i, node in enumerate(cluster.nodes)}
    for s, service in enumerate(cluster.services):
        if service.topology == "split" and service.head:
            h, head = by_name[service.head]
            for j, name in enumerate(service.workers):
                worker = by_name[name][1].data_interface
                if worker is None:
                    continue
                if head.data_interface is None:
                    raise RecipeError(f"{where}: services[{s}].workers[{j}]: {name}'s RPC worker listens on the data "
                                      f"network ({worker.ip}), and its head {head.name} is not on it",
                                      f"give nodes[{h}] a data_interface: in {worker.network}")
                if ipaddress.ip_address(worker.ip) not in head.data_interface.network:
                    raise RecipeError(f"{where}: services[{s}].workers[{j}]: {name}'s data address {worker.ip} is "
                                      f"outside {head.name}'s data network {head.data_interface.network}",
                                      "put the head and its workers in one data network (nothing routes there)")
        if service.topology == "pipeline":
            on = [name for name in service.nodes if by_name[name][1].data_interface]
            networks = {data.network for name in on if (data := by_name[name][1].data_interface)}
            if on and (len(on) != len(service.nodes) or len(networks) > 1):
                raise RecipeError(f"{where}: services[{s}].nodes: a pipeline's nodes reach each other on the data "
                                  f"network when all of them are on it, in one network; {', '.join(on)} of "
                                  f"{', '.join(service.nodes)} are", "give every node of the pipeline a "
                                  "data_interface: in one network, or none of them")


def _known(where: str, field: str, name: str, index: dict[str, int]) -> None:
    if name not in index:
        raise RecipeError(f"{where}: {field}: no node named {name!r}", f"nodes: {', '.join(index)}")


def _check_topology(service: Service, field: str, where: str) -> None:
    if service.engine == "llama.cpp" and service.topology == "pipeline":
        raise RecipeError(f"{where}: {field}.topology: pipeline is vLLM across nodes; llama.cpp spreads a GGUF "
                          "with split", "use topology: split (head: and workers:), or engine: vllm with a "
                          "Hugging Face model folder")
    if service.engine == "vllm" and service.topology == "split":
        raise RecipeError(f"{where}: {field}.topology: split is llama.cpp's RPC; vLLM spreads a model with "
                          "pipeline", "use topology: pipeline with nodes: [HEAD, NODE, ...]")


def _check_service(service: Service, i: int, where: str, base: Path, index: dict[str, int],
                   nodes: list[ClusterNode]) -> None:
    field = f"services[{i}]"
    _check_topology(service, field, where)
    if service.preseed and (service.topology != "split" or not service.head):
        why = "a split's RPC workers" if service.topology != "split" else "workers whose head is in this file"
        raise RecipeError(f"{where}: {field}.preseed: only {why} get the model to fill their tensor cache from",
                          "remove preseed:" if service.topology != "split" else
                          "add head: NODE and the model, or remove preseed:")
    if service.topology in ("replicate", "pipeline"):
        if service.head or service.workers:
            raise RecipeError(f"{where}: {field}: head and workers belong to topology: split",
                              f"list the nodes under nodes: ({service.topology})")
        least = 2 if service.topology == "pipeline" else 1
        if len(service.nodes) < least:
            raise RecipeError(f"{where}: {field}.nodes: {service.topology} needs at least "
                              f"{'one node' if least == 1 else f'{least} nodes'}",
                              "nodes: [NODE, ...] (a server runs on each)" if least == 1 else
                              "nodes: [HEAD, NODE, ...]; for one node use topology: replicate")
        for j, name in enumerate(service.nodes):
            _known(where, f"{field}.nodes[{j}]", name, index)
            if name in service.nodes[:j]:
                raise RecipeError(f"{where}: {field}.nodes[{j}]: {name!r} is listed twice", "list each node once")
    else:
        if service.nodes:
            raise RecipeError(f"{where}: {field}.nodes: split takes head: and workers:, not nodes:",
                              "head: NODE and workers: [NODE, ...]")
        if service.head:
            _known(where, f"{field}.head", service.head, index)
        if not service.workers:
            raise RecipeError(f"{where}: {field}.workers: split needs at least one RPC worker",
                              "workers: [NODE, ...]; for one node use topology: replicate")
        for j, name in enumerate(service.workers):
            _known(where, f"{field}.workers[{j}]", name, index)
            if name == service.head or name in service.workers[:j]:
                raise RecipeError(f"{where}: {field}.workers[{j}]: {name!r} is already in this service",
                                  "a node is the head or one worker of a split, once")
    _check_device(service, field, where, index, nodes)
    if service.topology == "split" and not service.head:
        return  # workers only: the head, and the model, are outside this file
    if not service.model:  # (a model without its sha256 was refused by ModelRef.locked_sha256)
        raise RecipeError(f"{where}: {field}.model: required (only a split without head: leaves it out)",
                          "model: the GGUF or model folder, sha256: its hash (`sha256sum FILE`, "
                          "`builder cluster hash-model DIR`)")
    service.ref.check(base, where, f"{field}.model")
    if service.engine == "vllm":
        check_vllm_service(service, field, where, [nodes[index[n]] for n in service.nodes],
                           [index[n] for n in service.nodes])
    elif service.ref.is_url and service.memory is None:
        raise RecipeError(f"{where}: {field}.memory: a model given by URL needs its memory stated",
                          "memory: e.g. 8GiB (what one copy of the model needs)")


def _need(service: Service, base: Path, where: str) -> float:
    """Memory one participating node needs for the service."""
    if service.memory is not None:
        total = float(service.memory)
    elif not service.model:
        return 0.0  # workers only: what they hold is the outside head's to say
    elif service.ref.is_hub:
        total = service.ref.locked(base, where, f"service {service.name}").size * MEMORY_FACTOR
    elif service.engine == "vllm":
        total = scan(base / service.model, where, service.model).size * MEMORY_FACTOR
    else:
        total = (base / service.model).stat().st_size * MEMORY_FACTOR
    # A split spreads the layers over the head and its workers, a pipeline over its nodes.
    if service.topology == "split":
        return total / (1 + len(service.workers))
    return total / len(service.nodes) if service.topology == "pipeline" else total


def _place(cluster: ServiceCluster, where: str, base: Path, index: dict[str, int]) -> tuple[Process, ...]:
    processes: list[Process] = []
    rpc_of: dict[str, str] = {}
    for i, service in enumerate(cluster.services):
        port = server_port(service)
        placed: list[tuple[str, Role, int]] = [(node, "server", port) for node in service.nodes]
        if service.topology == "pipeline":  # the other nodes join the first, which serves
            placed[1:] = [(node, "pipeline-worker", service.pipeline_port) for node in service.nodes[1:]]
        if service.topology == "split":
            placed = [(service.head, "server", port)] if service.head else []
            for j, worker in enumerate(service.workers):
                if worker in rpc_of:
                    raise RecipeError(f"{where}: services[{i}].workers[{j}]: {worker!r} is already an RPC worker of "
                                      f"{rpc_of[worker]!r}", "an RPC worker serves one head only: give this service "
                                      "its own worker nodes")
                rpc_of[worker] = service.name
                placed.append((worker, "rpc-worker", service.rpc_port))
        for name, role, at in placed:
            # what it runs: the service's device on a node that has several, else the node's one target
            node = cluster.nodes[index[name]]
            device = service.device if node.devices else None
            processes.append(Process(service.name, name, role, at, device, *node_variant(node, device)))
    ports: dict[tuple[str, int], str] = {}
    for process in processes:
        key = (process.node, process.port)
        if key in ports:
            i = next(k for k, s in enumerate(cluster.services) if s.name == process.service)
            derived = " (derived from its name)" if cluster.services[i].port is None else ""
            raise RecipeError(f"{where}: services[{i}].port: {process.port}{derived} on node {process.node!r} is "
                              f"already used by service {ports[key]!r}", "give one of the services a port: of its own")
        ports[key] = process.service
    for i, node in enumerate(cluster.nodes):
        hosted = {p.service for p in processes if p.node == node.name}
        if not hosted:
            continue
        needs = {s.name: _need(s, base, where) for s in cluster.services if s.name in hosted}
        if node.memory is None and not any(needs.values()):
            continue  # only workers of heads outside the file
        if node.memory is None:
            raise RecipeError(f"{where}: nodes[{i}].memory: {node.name} hosts {', '.join(sorted(hosted))} "
                              "but its memory is not declared", "memory: e.g. 64GiB (what models may use)")
        given = [*cluster.kernel_args, *node.kernel_args]
        if node.ram is not None or any(w.startswith("amdgpu.gttsize=") for w in given):
            mappable = node.board(given, f"{where}: nodes[{i}]").gpu_memory
            if mappable is not None and node.memory > mappable:
                raise RecipeError(
                    f"{where}: nodes[{i}].memory: {node.name} declares {_gib(node.memory)} for its models, but its "
                    f"iGPU can map {_gib(mappable)} (the board's RAM less the system's share)",
                    "lower memory:, or raise ram: if the board has more")
        if sum(needs.values()) > node.memory:
            parts = ", ".join(f"{name} {_gib(size)}" for name, size in needs.items())
            raise RecipeError(
                f"{where}: nodes[{i}].memory: {node.name} has {_gib(node.memory)} but its services need "
                f"{_gib(math.fsum(needs.values()))} ({parts})",
                "raise the node's memory if it has more, or move a service to another node")
    return tuple(processes)


def _check_admin_ports(cluster: ServiceCluster, processes: tuple[Process, ...], where: str) -> None:
    """The admins' ports are the ssh server's and the exporter's alone on every node."""
    if cluster.admins is None:
        return
    for process in processes:
        for field in ("ssh_port", "metrics_port"):
            if process.port == getattr(cluster.admins, field):
                raise RecipeError(f"{where}: admins.{field}: {process.port} is also the port of {process.service}'s "
                                  f"{process.role} on {process.node}", "give it or the service another port")


def load_cluster(path: Path, converted: dict[str, Any] | None = None) -> Loaded:
    """A checked cluster.yaml (or `converted`: the services form of that file, from convert()); every problem is
    one line naming the file, the field and a fix."""
    where = display_path(path)
    data = converted or load_yaml(path, "cluster", "pass the path of your cluster.yaml")
    notes: tuple[str, ...] = ()
    if is_old_form(data):
        data, notes = convert(data, path), (note(path),)
    nodes = data.get("nodes")
    for i, node in enumerate(nodes if isinstance(nodes, list) else []):
        field = next((f for f in ("role", "port", "vllm") if isinstance(node, dict) and f in node), None)
        if field:
            raise RecipeError(f"{where}: nodes[{i}].{field}: roles, ports and models come from services: in "
                              "this form", f"remove {field}; name the node in a service's nodes, head or workers "
                              "(a vLLM model is a service with engine: vllm)")
    cluster = validated(ServiceCluster, path, data)
    index = _check_nodes(cluster, where)
    _check_addresses(cluster, where)
    unsafe = [check_env(where, f"nodes[{i}]", node.env, node.unsafe_env) for i, node in enumerate(cluster.nodes)]
    seen: dict[str, int] = {}
    for i, service in enumerate(cluster.services):
        if service.name in seen:
            raise RecipeError(f"{where}: services[{i}].name: {service.name!r} is already "
                              f"services[{seen[service.name]}]",
                              "every service needs its own name: clients choose it by `model`")
        seen[service.name] = i
        sha256 = service.ref.locked_sha256(path.parent, where, f"services[{i}]")  # an hf:// model's from the lock
        if sha256 != service.sha256:
            cluster.services[i] = service = service.model_copy(update={"sha256": sha256})
        unsafe.append(check_args(where, f"services[{i}]", service.engine, service.args, service.unsafe_args))
        _check_service(service, i, where, path.parent, index, cluster.nodes)
    _check_data_network(cluster, where)
    processes = _place(cluster, where, path.parent, index)
    _check_admin_ports(cluster, processes, where)
    warnings = tuple(
        f"{where}: services[{i}].workers: {len(s.workers)} RPC workers; upstream reports deadlocks above "
        f"{MAX_QUIET_WORKERS}" for i, s in enumerate(cluster.services) if len(s.workers) > MAX_QUIET_WORKERS)
    warnings += tuple(line for line in unsafe if line)
    return Loaded(path, cluster, processes, warnings, notes)
