"""`builder cluster commands`: what to run on nodes that builder does not boot (e.g. NVIDIA boxes, whose
kernel driver is not in Debian's kernels), as `builder run` command lines, one per process.

The same processes as local mode and the netboot plans: RPC workers first (their heads connect to them),
then each llama-server bound to its node's address with `--alias SERVICE --metrics`, then each vLLM server
and pipeline node as `vllm_service.launch` gives it (local mode's lines). A box keeps every model under one
folder, named by its sha256 (`SHA256.gguf`, a model folder `SHA256/`), and every line that serves a model
carries `--model-sha256`, so `builder run` checks the file before the container starts. The RPC workers of a
service with `preseed: true` get its model too: they fill their tensor cache (`--rpc-cache`, beside the models)
from it before they listen (`rpc-worker --seed`).

A Ray pipeline (the GPU variants' vLLM) is not listed: each of its nodes' Ray containers needs the model
folder mounted, which a `builder run` line cannot say for the `ray-worker` role.
"""

import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from builder.cluster.model import Loaded, Process, Service
from builder.cluster.vllm_service import SOCKET_ENV, executor, launch, node_variant

_NAME_SUFFIX = {"server": "", "rpc-worker": "-rpc", "pipeline-worker": "-pipeline"}


@dataclass(frozen=True)
class BoxModel:
    """A model a node serves: where the cluster file has it, and the path the box keeps it under."""

    service: str
    source: str
    sha256: str
    path: str
    download: str | None = None  # an hf:// model's `hf download` line at the locked commit


@dataclass(frozen=True)
class NodeCommands:
    node: str
    address: str
    models: tuple[BoxModel, ...]
    argv: tuple[tuple[str, ...], ...]
    environment: tuple[str, ...]  # variables the lines pass from the box's environment (export them first)
    skipped: tuple[str, ...]  # services this node serves that have no command here (Ray pipelines)


def is_ray_pipeline(loaded: Loaded, service: Service) -> bool:
    return service.engine == "vllm" and service.topology == "pipeline" and \
        executor(*node_variant(loaded.node(service.nodes[0]), service.device)) == "ray"


# The image a process runs, from its target, variant and engine (export_kube.published_images: by digest)
Images = Callable[[str, str, str], str]


def _head(loaded: Loaded, process: Process, image: Images | None = None) -> list[str]:
    """`builder run` and its options up to the container's name (with `image`, --image REF: the published one)."""
    service = loaded.service(process.service)
    node = loaded.node(process.node)
    flavour = ["--flavour", "vllm"] if service.engine == "vllm" else []
    # the image of the device the service runs on (a node with several devices), else the node's one target
    chosen = node.pick(process.device)
    variant = ["--variant", chosen.variant] if chosen.variant else []
    env = [word for key, value in node.env.items() for word in ("--env", f"{key}={value}")]
    ref = ["--image", image(process.target, process.variant, service.engine)] if image else []
    return ["builder", "run", *flavour, "--target", chosen.target, *variant, *ref, *env, "--detach",
            "--name", f"builder-{service.name}{_NAME_SUFFIX[process.role]}"]


def _vllm_argv(loaded: Loaded, process: Process, models: str, image: Images | None) -> list[str]:
    service = loaded.service(process.service)
    addresses = {node.name: str(node.address) for node in loaded.cluster.nodes}
    peers = {node.name: str(node.peer_address) for node in loaded.cluster.nodes}
    started = launch(service, process, loaded.node(process.node), Path(service.ref.on_box(models)), addresses,
                     None, None, mount=False, peers=peers)
    flags = started.flags
    assert all(flag in ("--shm-size", "--env") for flag in flags[::2]), flags  # what `builder run` takes
    return [*_head(loaded, process, image), *flags, "--model-sha256", service.sha256, *started.argv]


def _argv(loaded: Loaded, process: Process, models: str, image: Images | None) -> tuple[str, ...]:
    service = loaded.service(process.service)
    if service.engine == "vllm":
        return tuple(_vllm_argv(loaded, process, models, image))
    address = str(loaded.node(process.node).address)
    head = _head(loaded, process, image)
    if process.role == "rpc-worker":
        # on the data network when the node has one (docs/netboot.md)
        worker = ("rpc-worker", "--host", str(loaded.node(process.node).peer_address), "--port", str(process.port))
        if not service.preseed:
            return (*head, *worker)
        # the worker's own copy of the model fills its tensor cache, kept beside the models across restarts
        return (*head, "--rpc-cache", f"{models.rstrip('/')}/rpc-cache", "--model-sha256", service.sha256, *worker,
                "--seed", service.ref.on_box(models))
    peers = {node.name: node.peer_address for node in loaded.cluster.nodes}
    args = server_args(service, service.ref.on_box(models), address, process.port, peers)
    return (*head, "--model-sha256", service.sha256, "server", *args)


def server_args(service: Service, model: str, address: str, port: int, workers: Mapping[str, str | None]
                ) -> list[str]:
    """llama-server's arguments for a service's server: its model, where it listens, its RPC workers (each
    worker node's address in `workers`), the service's own args last."""
    args = ["-m", model, "--host", address, "--port", str(port), "--alias", service.name, "--metrics"]
    if service.context:
        args += ["-c", str(service.context)]
    if service.topology == "split":
        args += ["--rpc", ",".join(f"{workers[w]}:{service.rpc_port}" for w in service.workers), "-ngl", "999"]
    return [*args, *service.args]


_ORDER = {"rpc-worker": 0, "server": 1, "pipeline-worker": 2}


def node_commands(loaded: Loaded, models: str, image: Images | None = None) -> list[NodeCommands]:
    """Every node with processes, in the file's order; `models` is the folder where each node keeps its models;
    `image`: each line runs that image (`--image`) instead of the target's local one."""
    out = []
    for node in loaded.cluster.nodes:
        mine = sorted((p for p in loaded.processes if p.node == node.name), key=lambda p: _ORDER[p.role])
        if not mine:
            continue
        listed = [p for p in mine if not is_ray_pipeline(loaded, loaded.service(p.service))]
        skipped = sorted({p.service for p in mine if p not in listed})
        served = [loaded.service(name) for name in dict.fromkeys(
            p.service for p in listed if p.role != "rpc-worker" or loaded.service(p.service).preseed)]
        pipelines = any(loaded.service(p.service).topology == "pipeline" for p in listed)
        out.append(NodeCommands(
            node.name, str(node.address),
            tuple(BoxModel(s.name, s.model, s.sha256, s.ref.on_box(models),
                           s.ref.download_line(loaded.path.parent, str(loaded.path), s.name)) for s in served),
            tuple(_argv(loaded, p, models, image) for p in listed), SOCKET_ENV if pipelines else (), tuple(skipped)))
    return out


def as_text(found: list[NodeCommands], models: str) -> list[str]:
    lines = []
    if any(entry.models for entry in found):
        lines += [f"# Each box keeps its models in {models}, named by sha256: copy each file below to the path shown "
                  "(a model folder with cp -r);", "# every line checks its model's sha256 before the container "
                  "starts (builder run --model-sha256)."]
    for entry in found:
        lines.append(f"# {entry.node} ({entry.address})")
        lines += [f"# {model.service}: {model.source} -> {model.path}"
                  + (f" (fetch it with: {model.download})" if model.download else "") for model in entry.models]
        if entry.environment:
            exports = " ".join(f"{name}=IFACE" for name in entry.environment)
            lines.append(f"# first: export {exports}, IFACE being the interface that holds {entry.address} "
                         "(the pipeline's traffic goes there)")
        lines += [shlex.join(argv) for argv in entry.argv]
        lines += [f"# {name}: a Ray pipeline; each node's Ray container needs the model folder mounted, which a "
                  "builder run line cannot do yet: use topology: replicate on these boxes, or try it with --local"
                  for name in entry.skipped]
    return lines
