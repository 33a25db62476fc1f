"""`builder cluster commands`: what to run on nodes that builder does not boot (e.g. NVIDIA boxes, whose
kernel driver is not in Debian's kernels), as `builder run` command lines, one per process.

The same processes as local mode and the netboot plans: RPC workers first (their heads connect to them),
then each llama-server bound to its node's address with `--alias SERVICE --metrics`. vLLM services are left
to netboot or `--local`: a pipeline's nodes join each other in ways a list of commands would hide.
"""

import shlex
from dataclasses import dataclass

from builder.cluster.model import Loaded, Process


@dataclass(frozen=True)
class NodeCommands:
    node: str
    address: str
    argv: tuple[tuple[str, ...], ...]
    skipped: tuple[str, ...]  # services this node serves that have no command here (vLLM)


def _target(loaded: Loaded, node: str) -> list[str]:
    found = loaded.node(node)
    return ["--target", found.target, *(["--variant", found.variant] if found.variant else [])]


def _argv(loaded: Loaded, process: Process, models: str) -> tuple[str, ...]:
    service = loaded.service(process.service)
    node = loaded.node(process.node)
    address = str(node.address)
    env = [word for key, value in node.env.items() for word in ("--env", f"{key}={value}")]
    head = ["builder", "run", *_target(loaded, process.node), *env, "--detach"]
    if process.role == "rpc-worker":
        return (*head, "--name", f"builder-{service.name}-rpc", "rpc-worker", "--host", address,
                "--port", str(process.port))
    model = f"{models.rstrip('/')}/{service.model.rsplit('/', 1)[-1]}"
    args = ["server", "-m", model, "--host", address, "--port", str(process.port), "--alias", service.name,
            "--metrics"]
    if service.context:
        args += ["-c", str(service.context)]
    if service.topology == "split":
        workers = ",".join(f"{loaded.node(w).address}:{service.rpc_port}" for w in service.workers)
        args += ["--rpc", workers, "-ngl", "999"]
    return (*head, "--name", f"builder-{service.name}", *args, *service.args)


def node_commands(loaded: Loaded, models: str) -> list[NodeCommands]:
    """Every node with processes, in the file's order; `models` is where each node keeps the GGUFs."""
    out = []
    for node in loaded.cluster.nodes:
        mine = sorted((p for p in loaded.processes if p.node == node.name), key=lambda p: p.role != "rpc-worker")
        if not mine:
            continue
        llama = [p for p in mine if loaded.service(p.service).engine == "llama.cpp"]
        skipped = sorted({p.service for p in mine if p not in llama})
        out.append(NodeCommands(node.name, str(node.address), tuple(_argv(loaded, p, models) for p in llama),
                                tuple(skipped)))
    return out


def as_text(found: list[NodeCommands]) -> list[str]:
    lines = []
    for entry in found:
        lines.append(f"# {entry.node} ({entry.address})")
        lines += [shlex.join(argv) for argv in entry.argv]
        lines += [f"# {name}: a vLLM service; netboot this node or try it with --local" for name in entry.skipped]
    return lines
