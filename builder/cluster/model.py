"""cluster.yaml with services: nodes (hardware) and services (a model served under one name, with a topology).

The netboot-only form (nodes with roles and one top-level `model`, builder/netboot/inventory.py) stays as it
is for `builder pxe publish`; the `builder cluster` verbs need the services form and say so in one line.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import ByteSize, Field

from builder.errors import RecipeError
from builder.models import Strict
from builder.netboot.inventory import Control, Node
from builder.recipes import display_path, load_yaml, select, validated

# A service name reaches HAProxy's config, JSON answers and container names: keep it to plain characters.
SERVICE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SERVER_PORT = 8080
RPC_PORT = 50052
# Upstream reports deadlocks with more than two RPC workers behind one head.
MAX_QUIET_WORKERS = 2
# Weights plus room for the KV cache and compute buffers, when a service does not say what it needs.
MEMORY_FACTOR = 1.2
GIB = 1 << 30


class ClusterNode(Node):
    """A node of the services form: its hardware facts; its roles come from the services placed on it."""

    role: Literal["head", "rpc-worker"] | None = Field(  # type: ignore[assignment]
        None, description="netboot-only form; with services: leave it out")
    memory: ByteSize | None = Field(None, description="memory its models may use, e.g. 64GiB (needed to host one)")


class Gateway(Strict):
    """The one OpenAI-compatible endpoint in front of every service (HAProxy on the control node)."""

    port: int = Field(8080, ge=1, le=65535, description="port users and agents connect to")
    metrics_port: int = Field(8405, ge=1, le=65535, description="Prometheus metrics and stats, on loopback only")
    key_file: str | None = Field(None, description="file holding the API key (default: generated in builder's state)")


class Service(Strict):
    """One model served under one name."""

    name: str = Field(pattern=SERVICE_NAME, description="the name clients send as `model`")
    engine: Literal["llama.cpp", "vllm"] = Field("llama.cpp", description="what serves it")
    model: str = Field(description="the GGUF: a path (relative to this file) or an http(s) URL")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the GGUF, checked before serving")
    memory: ByteSize | None = Field(None, description="memory the model needs (default: 1.2 × the GGUF's size)")
    topology: Literal["replicate", "split", "pipeline"] = Field(
        "replicate", description="replicate: a server per node; split: a head plus RPC workers")
    nodes: list[str] = Field(default_factory=list, description="replicate: the nodes that each run a server")
    head: str | None = Field(None, description="split: the node running llama-server")
    workers: list[str] = Field(default_factory=list, description="split: the nodes running ggml-rpc-server")
    port: int | None = Field(None, ge=1, le=65535, description="llama-server's port (default 8080 + index)")
    rpc_port: int = Field(RPC_PORT, ge=1, le=65535, description="split: the workers' port")
    context: int | None = Field(None, ge=64, description="context size (-c)")
    args: list[str] = Field(default_factory=list, description="extra llama-server arguments")


class ServiceCluster(Strict):
    """The services form of cluster.yaml."""

    control: Control | None = None
    gateway: Gateway = Field(default_factory=lambda: Gateway.model_validate({}))
    kernel_args: list[str] = Field(default_factory=lambda: ["console=tty0", "console=ttyS0,115200"],
                                   description="kernel command-line words for every node")
    nodes: list[ClusterNode] = Field(min_length=1)
    services: list[Service] = Field(min_length=1)


@dataclass(frozen=True)
class Process:
    """One server or RPC worker that a service runs on a node."""

    service: str
    node: str
    role: Literal["server", "rpc-worker"]
    port: int


@dataclass(frozen=True)
class Loaded:
    """A checked cluster file, what runs where, and warnings worth printing."""

    path: Path
    cluster: ServiceCluster
    processes: tuple[Process, ...]
    warnings: tuple[str, ...]

    def model_file(self, service: Service) -> Path | None:
        """The GGUF on this machine, or None for a URL."""
        return None if _is_url(service.model) else (self.path.parent / service.model)

    def service(self, name: str) -> Service:
        return next(s for s in self.cluster.services if s.name == name)

    def servers(self, service: str) -> list[Process]:
        return [p for p in self.processes if p.service == service and p.role == "server"]


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def _gib(size: float) -> str:
    return f"{size / GIB:.1f} GiB"


def server_port(service: Service, index: int) -> int:
    return service.port or SERVER_PORT + index


def _check_nodes(cluster: ServiceCluster, where: str) -> dict[str, int]:
    index: dict[str, int] = {}
    macs: dict[str, int] = {}
    for i, node in enumerate(cluster.nodes):
        if node.name in index:
            raise RecipeError(f"{where}: nodes[{i}].name: {node.name!r} is already nodes[{index[node.name]}]",
                              "give every node its own name")
        if node.mac in macs:
            raise RecipeError(f"{where}: nodes[{i}].mac: {node.mac} is already nodes[{macs[node.mac]}]",
                              "every node boots from its own network interface")
        if node.role is not None or node.port is not None:
            field = "role" if node.role is not None else "port"
            raise RecipeError(f"{where}: nodes[{i}].{field}: roles and ports come from services: in this form",
                              f"remove {field}; name the node in a service's nodes, head or workers")
        index[node.name], macs[node.mac] = i, i
        select(node.target, node.variant, f"{where}: nodes[{i}]")
    return index


def _known(where: str, field: str, name: str, index: dict[str, int]) -> None:
    if name not in index:
        raise RecipeError(f"{where}: {field}: no node named {name!r}", f"nodes: {', '.join(index)}")


def _check_service(service: Service, i: int, where: str, base: Path, index: dict[str, int]) -> None:
    field = f"services[{i}]"
    if service.engine == "vllm":
        raise RecipeError(f"{where}: {field}.engine: vllm services are not supported by builder cluster yet",
                          "use engine: llama.cpp with a GGUF for now")
    if service.topology == "pipeline":
        raise RecipeError(f"{where}: {field}.topology: pipeline (vLLM across nodes) is not supported yet",
                          "use topology: split to spread a GGUF over nodes, or replicate")
    if service.topology == "replicate":
        if service.head or service.workers:
            raise RecipeError(f"{where}: {field}: head and workers belong to topology: split",
                              "list the nodes that each run a server under nodes:")
        if not service.nodes:
            raise RecipeError(f"{where}: {field}.nodes: replicate needs at least one node",
                              "nodes: [NODE, ...] (a server runs on each)")
        for j, name in enumerate(service.nodes):
            _known(where, f"{field}.nodes[{j}]", name, index)
            if name in service.nodes[:j]:
                raise RecipeError(f"{where}: {field}.nodes[{j}]: {name!r} is listed twice", "list each node once")
    else:
        if service.nodes:
            raise RecipeError(f"{where}: {field}.nodes: split takes head: and workers:, not nodes:",
                              "head: NODE and workers: [NODE, ...]")
        if not service.head:
            raise RecipeError(f"{where}: {field}.head: split needs a head node", "head: NODE (runs llama-server)")
        _known(where, f"{field}.head", service.head, index)
        if not service.workers:
            raise RecipeError(f"{where}: {field}.workers: split needs at least one RPC worker",
                              "workers: [NODE, ...]; for one node use topology: replicate")
        for j, name in enumerate(service.workers):
            _known(where, f"{field}.workers[{j}]", name, index)
            if name == service.head or name in service.workers[:j]:
                raise RecipeError(f"{where}: {field}.workers[{j}]: {name!r} is already in this service",
                                  "a node is the head or one worker of a split, once")
    if _is_url(service.model):
        if service.memory is None:
            raise RecipeError(f"{where}: {field}.memory: a model given by URL needs its memory stated",
                              "memory: e.g. 8GiB (what one copy of the model needs)")
    elif "://" in service.model:
        raise RecipeError(f"{where}: {field}.model: only http:// and https:// URLs are fetched",
                          "give a path to the GGUF or an http(s) URL")
    elif not (base / service.model).is_file():
        raise RecipeError(f"{where}: {field}.model: {service.model} is not a file",
                          f"give the GGUF's path relative to {where}, or an http(s) URL")


def _need(service: Service, base: Path) -> float:
    """Memory one participating node needs for the service."""
    if service.memory is not None:
        total = float(service.memory)
    else:
        total = (base / service.model).stat().st_size * MEMORY_FACTOR
    # A split spreads the layers over the head and its workers.
    return total / (1 + len(service.workers)) if service.topology == "split" else total


def _place(cluster: ServiceCluster, where: str, base: Path, index: dict[str, int]) -> tuple[Process, ...]:
    processes: list[Process] = []
    rpc_of: dict[str, str] = {}
    for i, service in enumerate(cluster.services):
        port = server_port(service, i)
        if service.topology == "replicate":
            processes += [Process(service.name, node, "server", port) for node in service.nodes]
            continue
        assert service.head is not None
        processes.append(Process(service.name, service.head, "server", port))
        for j, worker in enumerate(service.workers):
            if worker in rpc_of:
                raise RecipeError(
                    f"{where}: services[{i}].workers[{j}]: {worker!r} is already an RPC worker of {rpc_of[worker]!r}",
                    "an RPC worker serves one head only: give this service its own worker nodes")
            rpc_of[worker] = service.name
            processes.append(Process(service.name, worker, "rpc-worker", service.rpc_port))
    ports: dict[tuple[str, int], str] = {}
    for process in processes:
        key = (process.node, process.port)
        if key in ports:
            i = next(k for k, s in enumerate(cluster.services) if s.name == process.service)
            raise RecipeError(f"{where}: services[{i}].port: {process.port} on node {process.node!r} is already "
                              f"used by service {ports[key]!r}", "give one of the services another port:")
        ports[key] = process.service
    for node in cluster.nodes:
        hosted = {p.service for p in processes if p.node == node.name}
        if not hosted:
            continue
        i = index[node.name]
        if node.memory is None:
            raise RecipeError(f"{where}: nodes[{i}].memory: {node.name} hosts {', '.join(sorted(hosted))} "
                              "but its memory is not declared", "memory: e.g. 64GiB (what models may use)")
        needs = {s.name: _need(s, base) for s in cluster.services if s.name in hosted}
        if sum(needs.values()) > node.memory:
            parts = ", ".join(f"{name} {_gib(size)}" for name, size in needs.items())
            raise RecipeError(
                f"{where}: nodes[{i}].memory: {node.name} has {_gib(node.memory)} but its services need "
                f"{_gib(math.fsum(needs.values()))} ({parts})",
                "raise the node's memory if it has more, or move a service to another node")
    return tuple(processes)


def load_cluster(path: Path) -> Loaded:
    """A checked services-form cluster.yaml; every problem is one line naming the file, the field and a fix."""
    where = display_path(path)
    data = load_yaml(path, "cluster", "pass the path of your cluster.yaml")
    if "services" not in data:
        raise RecipeError(f"{where}: services: this is the netboot-only form (nodes with roles, one model)",
                          "add services: (see docs/clusters.md); `builder pxe publish` still reads this form")
    cluster = validated(ServiceCluster, path, data)
    index = _check_nodes(cluster, where)
    seen: dict[str, int] = {}
    for i, service in enumerate(cluster.services):
        if service.name in seen:
            raise RecipeError(f"{where}: services[{i}].name: {service.name!r} is already "
                              f"services[{seen[service.name]}]",
                              "every service needs its own name: clients choose it by `model`")
        seen[service.name] = i
        _check_service(service, i, where, path.parent, index)
    processes = _place(cluster, where, path.parent, index)
    warnings = tuple(
        f"{where}: services[{i}].workers: {len(s.workers)} RPC workers; upstream reports deadlocks above "
        f"{MAX_QUIET_WORKERS}" for i, s in enumerate(cluster.services) if len(s.workers) > MAX_QUIET_WORKERS)
    return Loaded(path, cluster, processes, warnings)
