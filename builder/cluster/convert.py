"""The netboot-only form of cluster.yaml (nodes with `role:` and one top-level `model`), read as services.

builder has one cluster model, the services form (builder/cluster/model.py). A file in the older form is
converted when it is loaded, with one note saying so; `builder cluster convert FILE` prints the converted
file. The rules:

* a `head` node and `model` become a `split` service (head: that node, workers: the `rpc-worker` nodes);
  the model's sha256 is computed on load (a model given by http:// URL has none: refused, with how to
  rewrite the file); a head without workers becomes a `replicate` service on it;
* `rpc-worker` nodes without a head become a `split` service without `head` (workers only: the head runs
  outside the file);
* each `vllm-server` node becomes a `replicate` vLLM service on it (`served_name` is the service's name,
  `args` its args, `kv_cache_gib` the node's `env` VLLM_CPU_KVCACHE_SPACE); nodes serving one name with the
  same model, args and port are one service;
* every port stays what the old file gave (its `port:`, else 8080 for a head, 50052 for a worker, 8000 for
  a vLLM server); the workers of one service share one port, so workers on different ports are refused;
* a node that hosts a service gets `memory:` of 1.2 × the model's size, rounded up to a GiB: the services
  form needs it, and the old form never said it.
"""

import math
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from builder.cluster.hfmodel import folder_hash, scan
from builder.core.digests import sha256_file
from builder.core.errors import RecipeError
from builder.core.types import OneLine, http_url, one_line
from builder.recipe.load import display_path, validated
from builder.recipe.models import Strict

PORTS = {"head": 8080, "rpc-worker": 50052, "vllm-server": 8000}
WORKERS_ONLY = "rpc-workers"  # the name of a workers-only file's service
GIB = 1 << 30
REWRITE = "`builder cluster convert FILE` prints it in the services form (docs/clusters.md)"


def _model(value: str) -> str:
    """A file on the control node, or an http:// URL (which conversion refuses, once it is known to be used)."""
    return http_url(value) if value.startswith("http://") else one_line(value)


class _Vllm(Strict):
    model: OneLine
    served_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
    args: list[OneLine] = Field(default_factory=list)
    kv_cache_gib: int | None = Field(None, ge=1, le=4096)


class _Node(BaseModel):
    """What only the old form says of a node; the rest is checked as the services form's node."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    role: Literal["head", "rpc-worker", "vllm-server"]
    port: int | None = Field(None, ge=1, le=65535)
    vllm: _Vllm | None = None


class _Old(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    SCHEMA_COMMAND: ClassVar[str] = "builder cluster schema"

    model: Annotated[str, AfterValidator(_model)] | None = None
    context: int | None = Field(None, ge=64)
    nodes: list[_Node] = Field(min_length=1)


def is_old_form(data: dict[str, Any]) -> bool:
    return "services" not in data


def note(path: Path) -> str:
    return (f"{display_path(path)} uses the netboot-only form (nodes with role:); read as services: "
            f"{REWRITE.replace('FILE', display_path(path))}")


def _memory(size: float) -> str:
    return f"{max(1, math.ceil(size * 1.2 / GIB))}GiB"


def _service_name(model: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model).name.removesuffix(".gguf")).strip("-._")
    return stem[:64] or "model"


def _split(old: _Old, nodes: list[dict[str, Any]], where: str, base: Path) -> dict[str, Any] | None:
    heads = [i for i, n in enumerate(old.nodes) if n.role == "head"]
    workers = [i for i, n in enumerate(old.nodes) if n.role == "rpc-worker"]
    if len(heads) > 1:
        raise RecipeError(f"{where}: nodes[{heads[1]}].role: only one head per cluster (nodes[{heads[0]}] is one)")
    if not heads and not workers:
        return None
    ports = {old.nodes[i].port or PORTS["rpc-worker"] for i in workers}
    if len(ports) > 1:
        raise RecipeError(f"{where}: nodes[{workers[1]}].port: the workers of one service share one port, and "
                          f"these have {', '.join(map(str, sorted(ports)))}",
                          f"give every rpc-worker the same port, or write the file with services: ({REWRITE})")
    service: dict[str, Any] = {"name": WORKERS_ONLY, "topology": "split",
                               "workers": [old.nodes[i].name for i in workers]}
    if ports:
        service["rpc_port"] = ports.pop()
    if not heads:
        return service
    head = old.nodes[heads[0]]
    if not old.model:
        raise RecipeError(f"{where}: model: the head (nodes[{heads[0]}]) needs a model",
                          "model: /srv/models/NAME.gguf (a file on the control node)")
    if old.model.startswith(("http://", "https://")):
        raise RecipeError(f"{where}: model: {old.model} is a URL, and a service's model needs its sha256, which "
                          "this form cannot say", "write the file with services: (docs/clusters.md), giving the "
                          "URL as model: and the file's sha256 as sha256:, or give the GGUF's path here")
    path = base / old.model
    if not path.is_file():
        raise RecipeError(f"{where}: model: {old.model} is not a file",
                          "give a GGUF file on the control node")
    service.update(name=_service_name(old.model), model=old.model, sha256=sha256_file(path),
                   port=head.port or PORTS["head"])
    if old.context:
        service["context"] = old.context
    if workers:
        service["head"] = head.name
    else:
        service.update(topology="replicate", nodes=[head.name])
        del service["workers"]
    for i in [*heads, *workers]:
        nodes[i]["memory"] = _memory(path.stat().st_size)
    return service


def _vllm(old: _Old, nodes: list[dict[str, Any]], where: str, base: Path) -> list[dict[str, Any]]:
    services: dict[str, dict[str, Any]] = {}
    for i, node in enumerate(old.nodes):
        if (node.role == "vllm-server") != (node.vllm is not None):
            raise RecipeError(f"{where}: nodes[{i}].vllm: a vllm-server node needs `vllm:` (its model), and only "
                              "it has one", "vllm: {model: /srv/models/NAME, served_name: NAME}")
        if node.vllm is None:
            continue
        serve = node.vllm
        field = f"{where}: nodes[{i}].vllm.model"
        service = {"name": serve.served_name, "engine": "vllm", "model": serve.model,
                   "nodes": [node.name], "port": node.port or PORTS["vllm-server"], "args": list(serve.args)}
        nodes[i]["memory"] = _memory(scan(base / serve.model, field, serve.model).size)
        if serve.kv_cache_gib:
            nodes[i].setdefault("env", {})["VLLM_CPU_KVCACHE_SPACE"] = str(serve.kv_cache_gib)
        same = services.get(serve.served_name)
        if same is None:
            services[serve.served_name] = {**service, "sha256": folder_hash(base / serve.model, field, serve.model)}
        elif all(same[k] == service[k] for k in ("model", "port", "args")):
            same["nodes"].append(node.name)
        else:
            raise RecipeError(f"{where}: nodes[{i}].vllm.served_name: {serve.served_name!r} is served by another "
                              "node with another model, port or args", "give each model its own served_name")
    return list(services.values())


def convert(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """The services form of a netboot-only cluster file's data (see the module docstring)."""
    where = display_path(path)
    old = validated(_Old, path, data)
    nodes = [{k: v for k, v in raw.items() if k not in ("role", "port", "vllm")} for raw in data["nodes"]]
    services = _vllm(old, nodes, where, path.parent)
    split = _split(old, nodes, where, path.parent)
    if split is not None:
        if split["name"] in {s["name"] for s in services}:
            split["name"] = f"{split['name']}-split"
        services.insert(0, split)
    out = {k: v for k, v in data.items() if k not in ("model", "context", "nodes")}
    return {**out, "nodes": nodes, "services": services}
