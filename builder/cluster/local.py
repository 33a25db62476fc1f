"""A whole cluster on this machine: every node a container of its own image on the host network, bound to its
own loopback address (127.0.0.11, 127.0.0.12, …), and the gateway (HAProxy on the host) on 127.0.0.1.

Containers are started through builder's engine layer rather than a compose tool: Debian bookworm's
podman-compose 1.0.3 adds a project network beside `network_mode: host`, which podman refuses, and reports
success anyway; docker-compose 1.29 drives docker only (docs/design.md).
"""

import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder.cluster.commands import server_args
from builder.cluster.gateway import (
    ServerState,
    apply_config,
    gateway_pid,
    read_stats,
    stop_gateway,
    write_gateway,
)
from builder.cluster.model import Loaded, Process
from builder.cluster.vllm_service import launch
from builder.core.errors import BuilderError, RecipeError
from builder.core.run import run
from builder.engines import Engine, get_engine
from builder.flavours.prepare import FLAVOURS, prepare, recipe_file
from builder.pipeline.build import build
from builder.recipe.load import display_path
from builder.recipe.targets import TARGETS
from builder.use.launch import image_for_run

GATEWAY_ADDRESS = "127.0.0.1"
# Every node's address is on the host's loopback interface: what GLOO/NCCL_SOCKET_IFNAME name.
LOOPBACK_INTERFACE = "lo"
FIRST_NODE = 11
LABEL = "dev.builder.cluster"
SEED_WAIT = 600  # seconds a preseeding RPC worker may take to fill its tensor cache before it listens
Say = Callable[[str], None]


def node_addresses(loaded: Loaded) -> dict[str, str]:
    return {node.name: f"127.0.0.{FIRST_NODE + i}" for i, node in enumerate(loaded.cluster.nodes)}


@dataclass(frozen=True)
class Local:
    """Where one cluster file's local run keeps its state, and how its containers are named."""

    loaded: Loaded
    state: Path
    project: str

    @classmethod
    def of(cls, loaded: Loaded) -> "Local":
        project, state = loaded.state_folder("")
        return cls(loaded, state, project)

    def container(self, process: Process) -> str:
        suffix = {"rpc-worker": "rpc", "pipeline-worker": "pipeline"}.get(process.role, "server")
        return f"{self.project}-{process.node}-{process.service}-{suffix}"

    @property
    def pidfile(self) -> Path:
        return self.state / "haproxy.pid"

    @property
    def endpoint(self) -> str:
        return f"http://{GATEWAY_ADDRESS}:{self.loaded.cluster.gateway.port}/v1"


def _engine_of(local: Local, engine_name: str | None) -> Engine:
    recorded = local.state / "engine"
    if engine_name is None:
        engine_name = recorded.read_text().strip() if recorded.is_file() else "auto"
    engine = get_engine(engine_name)
    recorded.write_text(engine.name + "\n")
    return engine


def _images(loaded: Loaded, engine: Engine, say: Say) -> dict[Process, str]:
    """The image of every process: the last build of its target and variant (the node's, or on a node with
    several devices the one its service picks) in the service engine's flavour, built now if there is none."""
    images: dict[tuple[str, str, str], str] = {}
    out: dict[Process, str] = {}
    for process in loaded.processes:
        kind = loaded.service(process.service).engine
        key = (process.target, process.variant, kind)
        if key not in images:
            flavour = FLAVOURS[kind]
            prep = prepare(recipe_file(process.target, None, flavour), process.variant, flavour=flavour)
            try:
                images[key] = image_for_run(engine, prep)
            except RecipeError:
                say(f"building {process.target}/{prep.plan.variant} ({flavour.name}) for node {process.node} …")
                images[key] = build(prep, engine).ref
        out[process] = images[key]
    return out


def _models(loaded: Loaded, say: Say) -> dict[str, Path]:
    """Every service's GGUF or model folder on this machine, checked against its sha256."""
    # a workers-only split has no model here
    return {service.name: loaded.local_model(i, say, loaded.path.name if service.engine == "vllm" else None)
            for i, service in enumerate(loaded.cluster.services) if service.model}


def ray_token(local: Local) -> Path:
    """The Ray cluster token of this cluster's pipelines: generated once, mode 0600, given as a file."""
    path = local.state / "ray-token"
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    return path


def process_argv(local: Local, engine: Engine, process: Process, image: str, model: Path) -> list[str]:
    loaded = local.loaded
    address = node_addresses(loaded)
    service = loaded.service(process.service)
    node = loaded.node(process.node)
    variant = TARGETS[process.target].variants[process.variant]  # its devices, groups and environment
    argv = [*engine.run_argv(), "--detach", "--network", "host", "--name", local.container(process),
            "--label", f"{LABEL}={local.project}", *engine.device_flags(variant.host)]
    for key, value in node.env.items():
        argv += ["--env", f"{key}={value}"]
    if service.engine == "vllm":
        started = launch(service, process, node, model, address, LOOPBACK_INTERFACE, lambda: ray_token(local))
        return [*argv, *started.flags, image, *started.argv]
    inside = f"/models/{process.service}.gguf"
    if process.role == "rpc-worker":
        # preseed: the worker fills its tensor cache from its own copy of the model before it listens
        seed = ["--volume", f"{model}:{inside}:ro"] if service.preseed else []
        return [*argv, *seed, image, "rpc-worker", "--host", address[process.node], "--port", str(process.port),
                *(["--seed", inside] if service.preseed else [])]
    args = server_args(service, inside, address[process.node], process.port, address)
    return [*argv, "--volume", f"{model}:{inside}:ro", image, "server", *args]


def containers(local: Local, engine: Engine) -> dict[str, str]:
    """This cluster's containers and their state (running, exited …), by name."""
    proc = run([*engine.command(), "ps", "--all", "--filter", f"label={LABEL}={local.project}",
                "--format", "{{.Names}} {{.State}}"], timeout=60)
    out = {}
    for line in proc.stdout.splitlines():
        if line.strip():
            name, _, state = line.partition(" ")
            word = state.split()[0].lower() if state.split() else "unknown"
            # podman 4.3 prints "Up 5 seconds ago" / "Exited (137) …" where docker prints running / exited
            out[name] = "running" if word == "up" else word
    return out


def _remove(engine: Engine, names: list[str]) -> None:
    """Remove containers that exist: podman 4.3's `rm --force A B` removes neither, silently, when B does not."""
    if names:
        run([*engine.command(), "rm", "--force", *names], check=False, timeout=120)


def _remove_started(local: Local, engine: Engine, names: list[str]) -> None:
    """Remove what `up` started, of which the last may or may not exist (a stop during its `run`)."""
    try:
        present = containers(local, engine)
    except BuilderError:
        for name in names:
            _remove(engine, [name])
        return
    _remove(engine, [name for name in names if name in present])


def _wait_port(address: str, port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.3)
    return False


def _log_tail(engine: Engine, name: str, lines: int = 15) -> str:
    proc = run([*engine.command(), "logs", "--tail", str(lines), name], check=False, timeout=60)
    return ((proc.stdout or "") + (proc.stderr or "")).strip()


def up(loaded: Loaded, engine_name: str | None, timeout: float, say: Say) -> Local:
    """Start what is not running (workers first, then servers, then the gateway) and wait until every server is
    healthy behind the gateway; on failure remove what this call started."""
    local = Local.of(loaded)
    for i, service in enumerate(loaded.cluster.services):
        if service.topology == "split" and not service.head:
            raise RecipeError(f"{display_path(loaded.path)}: services[{i}].head: {service.name} is workers only (its "
                              "head runs outside the file): nothing for --local to serve", "add head: NODE to run "
                              "it here, or netboot the workers (`builder pxe publish`)")
    models = _models(loaded, say)
    engine = _engine_of(local, engine_name)
    images = _images(loaded, engine, say)
    address = node_addresses(loaded)
    existing = containers(local, engine)
    started: list[str] = []
    gateway_started = False
    try:
        # RPC workers before their head; a pipeline's first node (the Ray head) before the nodes joining it
        ordered = sorted(loaded.processes, key=lambda p: ("rpc-worker", "server", "pipeline-worker").index(p.role))
        for process in ordered:
            name = local.container(process)
            if existing.get(name) == "running":
                continue
            if name in existing:
                _remove(engine, [name])
            say(f"starting {process.role} {process.service} on {process.node} ({address[process.node]}:{process.port})")
            # counted before the run: a stop (Ctrl-C, SIGTERM) during it can leave the container created
            started.append(name)
            run(process_argv(local, engine, process, images[process], models[process.service]), timeout=120)
            # a preseeding worker hashes and copies its share of the model first
            wait = SEED_WAIT if loaded.service(process.service).preseed else 60
            if process.role == "rpc-worker" and not _wait_port(address[process.node], process.port, wait):
                raise BuilderError(f"RPC worker {name} did not listen on {address[process.node]}:{process.port}",
                                   _log_tail(engine, name))
        previous = (local.state / "haproxy.cfg").read_text() if (local.state / "haproxy.cfg").is_file() else None
        config = write_gateway(loaded, local.state, GATEWAY_ADDRESS, address)
        # A running gateway with the same config keeps serving; a changed one is reloaded (requests in flight
        # finish on the old worker).
        if gateway_pid(local.pidfile) is None or config.read_text() != previous:
            gateway_started = gateway_pid(local.pidfile) is None  # before the start: a stop during it cleans up
            gateway_started = apply_config(config, local.pidfile) or gateway_started
        _wait_healthy(local, engine, timeout)
    except BaseException:
        if gateway_started:
            stop_gateway(local.pidfile)
        _remove_started(local, engine, started)
        raise
    return local


def _wait_healthy(local: Local, engine: Engine, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    servers = [p for p in local.loaded.processes if p.role == "server"]
    while True:
        states = {(s.service, s.node): s.healthy for s in read_stats(local.loaded.cluster.gateway.metrics_port)}
        waiting = [p for p in servers if not states.get((p.service, p.node))]
        if not waiting:
            return
        now = containers(local, engine)
        joined = [p for p in local.loaded.processes if p.role == "pipeline-worker"]
        for process in [*waiting, *joined]:
            name = local.container(process)
            if now.get(name) != "running":
                what = "pipeline worker" if process.role == "pipeline-worker" else "server"
                raise BuilderError(f"{process.service} on {process.node}: the {what} exited ({name})",
                                   "its last lines:\n" + _log_tail(engine, name))
        if time.monotonic() > deadline:
            first = waiting[0]
            raise BuilderError(
                f"{first.service} on {first.node} is not healthy after {timeout:.0f} s "
                f"({len(waiting)} of {len(servers)} servers waiting)",
                f"its last lines (raise --timeout for big models):\n{_log_tail(engine, local.container(first))}")
        time.sleep(1)


def down(loaded: Loaded, engine_name: str | None) -> list[str]:
    """Remove the cluster's containers and stop its gateway; the key stays for the next `up`."""
    local = Local.of(loaded)
    engine = _engine_of(local, engine_name)
    names = sorted(containers(local, engine))
    _remove(engine, names)
    # one that vanished between the listing and `rm` (another `down`) makes podman 4.3 remove none: one by one
    for name in sorted(containers(local, engine)):
        _remove(engine, [name])
    if stop_gateway(local.pidfile):
        names.append("gateway")
    return names


def status(loaded: Loaded, engine_name: str | None) -> dict[str, object]:
    """Services, nodes and every process's health, as one document."""
    local = Local.of(loaded)
    engine = _engine_of(local, engine_name)
    address = node_addresses(loaded)
    running = containers(local, engine)
    try:
        stats: dict[tuple[str, str], ServerState] | None = {
            (s.service, s.node): s for s in read_stats(loaded.cluster.gateway.metrics_port)}
    except BuilderError:
        stats = None
    services = []
    for service in loaded.cluster.services:
        processes = []
        for process in (p for p in loaded.processes if p.service == service.name):
            entry: dict[str, object] = {
                "node": process.node, "role": process.role, "address": f"{address[process.node]}:{process.port}",
                "container": running.get(local.container(process), "absent")}
            state = (stats or {}).get((process.service, process.node)) if process.role == "server" else None
            if state is not None:
                entry.update(state.fields())
            elif process.role == "pipeline-worker":
                entry["health"] = "UP" if entry["container"] == "running" else "DOWN"
            elif process.role == "rpc-worker":
                entry["health"] = "UP" if _wait_port(address[process.node], process.port, 0.5) else "DOWN"
            else:
                entry["health"] = "unknown"
            processes.append(entry)
        services.append({"name": service.name, "topology": service.topology, "processes": processes})
    return {
        "cluster": str(loaded.path), "engine": engine.name,
        "gateway": {"endpoint": local.endpoint, "running": stats is not None,
                    "key_file": str(_key_path(local)), "metrics": f"http://127.0.0.1:"
                    f"{loaded.cluster.gateway.metrics_port}/metrics"},
        "nodes": [{"name": n.name, "address": address[n.name], "target": n.target, "devices": n.devices_json}
                  for n in loaded.cluster.nodes],
        "services": services,
    }


def _key_path(local: Local) -> Path:
    key_file = local.loaded.cluster.gateway.key_file
    return local.loaded.path.parent / key_file if key_file else local.state / "api-key"


def logs(loaded: Loaded, engine_name: str | None, only: str | None, lines: int) -> None:
    """The last lines of every container's output (or those whose name contains `only`)."""
    local = Local.of(loaded)
    engine = _engine_of(local, engine_name)
    names = sorted(containers(local, engine))
    chosen = [n for n in names if only is None or only in n.removeprefix(local.project + "-")]
    if not chosen:
        raise RecipeError(f"no container of this cluster matches {only!r}" if only else "the cluster is not up",
                          "`builder cluster status --local FILE` lists them")
    for name in chosen:
        sys.stdout.write(f"==> {name} <==\n{_log_tail(engine, name, lines)}\n")
