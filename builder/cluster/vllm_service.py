"""vLLM services of a cluster file: which image a node runs them with, how a pipeline spans nodes, and the
`vllm serve` / Ray command lines of every process.

A node says its hardware (target, variant, or several devices of which a service picks one); a service's engine
picks the flavour: a vLLM service runs them with the vllm flavour (recipes/vllm/TARGET.yaml), a llama.cpp service
with the llama.cpp one. A node that hosts both kinds runs both images.

A pipeline splits the model's layers over its nodes (`--pipeline-parallel-size` = the number of nodes), the
first node serving the API. How the nodes join depends on what the variant's vLLM can do:
- Ray (every GPU variant, whose lock pins ray): the first node runs the Ray head and `vllm serve
  --distributed-executor-backend ray`, the others `ray-worker` joined to it, with Ray's token authentication
  (a token generated once per cluster, given to the containers as a read-only file, never on a command line);
- vLLM's own multi-node executor (cpu): vLLM 0.32.0's CPU platform has no Ray support (it stops with
  "ValueError: current platform cpu does not support ray", measured, docs/clusters.md), so the first node runs
  `vllm serve --nnodes N --node-rank 0 --master-addr ITS_ADDRESS` and the others the same command with their
  rank and `--headless`; torch.distributed (gloo) carries the activations between them.
Every process binds its node's own address; VLLM_HOST_IP says it to vLLM, GLOO_SOCKET_IFNAME and
NCCL_SOCKET_IFNAME the interface that address is on.
"""

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from builder.core.errors import RecipeError
from builder.fetch.wheels import requirement_name
from builder.flavours.vllm import VLLM_DEVICES, load_vllm_recipe, vllm_recipes
from builder.recipe.targets import TARGETS

if TYPE_CHECKING:
    from builder.cluster.model import ClusterNode, Process, Service

Executor = Literal["ray", "mp"]
MODELS = "/models"
RAY_TOKEN = "/run/builder/ray-token"
# vLLM's workers exchange tensors through shared memory; the engines' default /dev/shm is 64 MiB.
SHM_SIZE = "1g"
# Platforms whose vLLM cannot run the Ray executor, with what it says when asked to.
NO_RAY = {"cpu": "vLLM's CPU platform has no Ray executor ('current platform cpu does not support ray')"}
# A pipeline's processes find the interface that holds their node's address in these.
SOCKET_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def node_variant(node: "ClusterNode", device: str | None = None) -> tuple[str, str]:
    """(target, variant) a service runs on a node (`device`: the service's pick on a node with several), the
    variant's default filled in."""
    chosen = node.pick(device)
    return chosen.target, chosen.variant or TARGETS[chosen.target].default_variant


def executor(target: str, variant: str) -> Executor | None:
    """How a pipeline of this variant's vLLM spans nodes; None when it cannot."""
    device = VLLM_DEVICES[(target, variant)]
    if device in NO_RAY:
        return "mp"
    section = load_vllm_recipe(vllm_recipes() / f"{target}.yaml").variants[variant]
    return "ray" if any(requirement_name(str(r)) == "ray" for r in section.requirements) else None


def check_vllm_service(service: "Service", field: str, where: str, nodes: list["ClusterNode"],
                       at: list[int]) -> None:
    """A vLLM service's nodes (its model folder is checked as every service's model is: ModelRef.check)."""
    for j, node in enumerate(nodes):
        target, variant = node_variant(node, service.device)
        path = vllm_recipes() / f"{target}.yaml"
        if (target, variant) not in VLLM_DEVICES or not path.is_file() or \
                variant not in load_vllm_recipe(path).variants:
            runs_on = ", ".join(f"{t}/{v}" for t, v in VLLM_DEVICES)
            raise RecipeError(f"{where}: {field}.nodes[{j}]: node {node.name} is {target}/{variant}, which has no "
                              f"vLLM recipe (nodes[{at[j]}])", f"vLLM runs on {runs_on}: place the service on such "
                              "a node, or serve a GGUF with engine: llama.cpp")
    if service.topology != "pipeline":
        return
    kinds = {node_variant(n, service.device) for n in nodes}
    if len(kinds) > 1:
        raise RecipeError(f"{where}: {field}.nodes: a pipeline runs one vLLM build on every node, these are "
                          f"{', '.join(sorted(f'{t}/{v}' for t, v in kinds))}",
                          "list nodes of one target and variant")
    target, variant = kinds.pop()
    if executor(target, variant) is None:
        raise RecipeError(f"{where}: {field}.topology: the vLLM image of {target}/{variant} cannot span nodes "
                          "(its lock has no Ray)", "use topology: replicate, or add ray to its recipe")
    if executor(target, variant) == "mp" and "--enforce-eager" in service.args:
        # vLLM 0.32.0 on CPU allocates a later stage's input buffer only while warming up a compiled model
        # ("assert self.intermediate_tensors is not None" at the first request, measured).
        raise RecipeError(f"{where}: {field}.args: --enforce-eager breaks a cpu pipeline (vLLM skips the warm-up "
                          "that allocates the later stages' input buffers)",
                          "leave it out; -cc.backend=eager compiles without a C++ build")


@dataclass(frozen=True)
class Launch:
    """What a vLLM process needs besides builder's usual container flags: more flags, and the image's argv."""

    flags: list[str]
    argv: list[str]


def _serve_args(service: "Service", model: str, address: str, port: int | None) -> list[str]:
    """`vllm serve` arguments; a headless pipeline node (port None) serves no API."""
    listen = ["--host", address, "--port", str(port)] if port is not None else []
    args = [model, *listen, "--served-model-name", service.name]
    if service.context:
        args += ["--max-model-len", str(service.context)]
    return [*args, *service.args]


def launch(service: "Service", process: "Process", node: "ClusterNode", model: Path,
           addresses: dict[str, str], interface: str | None, ray_token: Callable[[], Path] | None,
           mount: bool = True, peers: dict[str, str] | None = None) -> Launch:
    """The flags and image arguments of one vLLM server or pipeline worker. `model` is the folder on the
    machine that runs it: mounted at /models/SERVICE, or with `mount` False named as it is (`builder run
    … serve FOLDER` mounts it itself). `interface` None: the socket interface variables come from the
    caller's environment (`--env NAME` alone). `ray_token` None: the caller refuses Ray pipelines (netboot,
    `builder run` lines). `peers`: where the pipeline's nodes reach each other (their data addresses,
    docs/netboot.md), when not at `addresses`, where the API listens."""
    address = addresses[process.node]
    peers = peers or addresses
    flags = ["--shm-size", SHM_SIZE, "--env", f"VLLM_HOST_IP={peers[process.node]}", "--env", "HF_HUB_OFFLINE=1"]
    served = f"{MODELS}/{service.name}" if mount else str(model)
    flags += ["--volume", f"{model}:{served}:ro"] if mount else []
    if service.topology != "pipeline":
        return Launch(flags, ["serve", *_serve_args(service, served, address, process.port)])
    size = len(service.nodes)
    head = peers[service.nodes[0]]
    rank = service.nodes.index(process.node)
    for name in SOCKET_ENV:
        flags += ["--env", name if interface is None else f"{name}={interface}"]
    kind = executor(*node_variant(node, service.device))
    if kind == "mp":
        serve = [*_serve_args(service, served, address, None if rank else process.port),
                 "--pipeline-parallel-size", str(size), "--distributed-executor-backend", "mp",
                 "--nnodes", str(size), "--node-rank", str(rank), "--master-addr", head,
                 "--master-port", str(service.pipeline_port)]
        return Launch(flags, ["serve", *serve, *(["--headless"] if rank else [])])
    assert ray_token is not None, "a Ray pipeline where its caller refuses them"
    flags += ["--env", f"RAY_AUTH_TOKEN_PATH={RAY_TOKEN}", "--volume", f"{ray_token()}:{RAY_TOKEN}:ro"]
    if rank:
        return Launch(flags, ["ray-worker", "--head", f"{head}:{service.pipeline_port}", "--host",
                              peers[process.node]])
    ray = ["ray", "start", "--head", "--node-ip-address", peers[process.node], "--port", str(service.pipeline_port),
           "--include-dashboard", "false", "--disable-usage-stats"]
    serve = ["vllm", "serve", *_serve_args(service, served, address, process.port), "--pipeline-parallel-size",
             str(size), "--distributed-executor-backend", "ray"]
    return Launch(flags, ["shell", "-c", f"{shlex.join(ray)} && exec {shlex.join(serve)}"])
