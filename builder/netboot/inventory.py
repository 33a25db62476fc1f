"""cluster.yaml: the control node and the compute nodes it netboots, validated like recipes."""

import json
import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, field_validator

from builder.core.errors import RecipeError
from builder.core.types import Address, CacheDevice, HostName, InterfaceName, Ipv4, KernelArg, http_url, one_line
from builder.netboot.kernels import KERNELS
from builder.recipe.load import display_path, load_yaml, select, validated
from builder.recipe.models import Strict

_MAC = re.compile(r"([0-9a-f]{2})([:-][0-9a-f]{2}){5}")
DEFAULT_PORTS = {"head": 8080, "rpc-worker": 50052, "vllm-server": 8000}
GGUF_MAGIC = b"GGUF"


def _model(value: str) -> str:
    """An http:// URL the head downloads, or a file on the control node (published as a blob)."""
    if value.startswith("http://"):
        return http_url(value)
    return one_line(value)


class Control(Strict):
    """The control node: serves the boot files over HTTP (and proxy-DHCP/TFTP with dnsmasq)."""

    SCHEMA_COMMAND: ClassVar[str] = "builder cluster schema"

    address: Address = Field(description="address the compute nodes reach the control node at")
    http_port: int = Field(8000, ge=1, le=65535, description="port of `builder pxe serve`'s HTTP server")
    interface: InterfaceName | None = Field(None, description="network interface dnsmasq answers PXE requests on")
    subnet: Ipv4 | None = Field(None, description="the nodes' IPv4 network (e.g. 192.168.50.0), for proxy-DHCP")


class Cache(Strict):
    """A node's cache disk: root images are kept there by sha256 and opened through dm-verity."""

    device: CacheDevice = Field(description="PARTLABEL=NAME or /dev/disk/by-id/NAME (found by this stable name)")
    wipe: bool = Field(False, description="format the device even when it holds other data (otherwise only an "
                       "empty device, or one holding builder's cache, is used)")


def _vllm_arg(value: str) -> str:
    # It travels on the kernel command line, the words of one list joined by commas.
    if not re.fullmatch(r"[A-Za-z0-9_.:=/+@%~-]{1,128}", value):
        raise ValueError("must be one word of letters, digits and _ . : = / + @ % ~ - (no spaces or commas)")
    return value


VllmArg = Annotated[str, AfterValidator(_vllm_arg)]


class VllmServe(Strict):
    """What a `vllm-server` node serves: a Hugging Face model folder on the control node, published by sha256."""

    model: Annotated[str, AfterValidator(one_line)] = Field(
        description="a Hugging Face model folder on the control node (config.json, weights, tokenizer)")
    served_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$",
                             description="the name clients ask for (the OpenAI API's `model`)")
    args: list[VllmArg] = Field(default_factory=list, description="more `vllm serve` arguments, one word each, "
                                "e.g. [--dtype, float32, --max-model-len, '4096']")
    kv_cache_gib: int | None = Field(None, ge=1, le=4096, description="vLLM's CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")


class Node(Strict):
    """One compute node, found by the MAC address it netboots from."""

    name: HostName = Field(description="host name (lowercase letters, digits, '-')")
    mac: str = Field(description="MAC address of the boot interface, e.g. 52:54:00:12:34:56")
    target: str = Field(description="target whose image the node boots (see `builder targets`)")
    variant: str | None = Field(None, description="variant of the target (default: the target's default)")
    role: Literal["head", "rpc-worker", "vllm-server"] = Field(
        description="head: llama-server --rpc to the workers; vllm-server: the target's vLLM image serving `vllm`")
    port: int | None = Field(None, ge=1, le=65535, description="role port (head 8080, rpc-worker 50052, "
                             "vllm-server 8000)")
    address: Address | None = Field(None, description="the node's reserved address; workers need one if there is "
                                    "a head")
    kernel_args: list[KernelArg] = Field(default_factory=list, description="extra kernel command-line words")
    cache: Cache | Literal[False] | None = Field(
        None, description="this node's cache disk (default: the cluster's `cache`); false: none, RAM mode")
    vllm: VllmServe | None = Field(None, description="the model a vllm-server node serves")

    @field_validator("mac", mode="before")
    @classmethod
    def _sexagesimal(cls, value: object) -> object:
        # YAML 1.1 reads an unquoted all-digit MAC such as 52:54:00:12:34:56 as a base-60 number;
        # every pair is then below 60, so the pairs can be recovered exactly.
        if isinstance(value, int) and value >= 0:
            pairs = []
            for _ in range(6):
                value, pair = divmod(value, 60)
                pairs.append(f"{pair:02d}")
            return ":".join(reversed(pairs)) if value == 0 else str(value)
        return value

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str) -> str:
        value = value.lower()
        if not _MAC.fullmatch(value):
            raise ValueError("must be six hex pairs separated by ':' or '-', e.g. 52:54:00:12:34:56")
        return value.replace("-", ":")

    @property
    def role_port(self) -> int:
        return self.port or DEFAULT_PORTS[self.role]

    @property
    def netboot_set(self) -> tuple[str, str]:
        """(target, variant) of the netboot set the node boots; a vLLM image's variant is spelt `vllm-VARIANT`,
        as its image tag is."""
        variant = select(self.target, self.variant)[1].name
        return (self.target, f"vllm-{variant}" if self.role == "vllm-server" else variant)

    @property
    def file_stem(self) -> str:
        """How iPXE's ${mac:hexhyp} spells the MAC: the node's boot script is nodes/<stem>.ipxe."""
        return self.mac.replace(":", "-")


class Cluster(Strict):
    """The inventory: what `builder pxe publish` turns into boot scripts for every node."""

    SCHEMA_COMMAND: ClassVar[str] = "builder cluster schema --form netboot"

    control: Control
    model: Annotated[str, AfterValidator(_model)] | None = Field(
        None, description="the head's model: a GGUF path on the control node or an http URL")
    context: int | None = Field(None, ge=64, description="the head's context size (-c)")
    kernel_args: list[KernelArg] = Field(default_factory=lambda: ["console=tty0", "console=ttyS0,115200"],
                                   description="kernel command-line words for every node")
    cache: Cache | None = Field(None, description="every node's cache disk (a node's own `cache` wins); "
                                "without one a node holds its root in RAM")
    ram_share: int = Field(50, ge=1, le=100, description="a node in RAM mode warns when its root is larger "
                           "than this percentage of its memory")
    nodes: list[Node] = Field(min_length=1)

    def cache_of(self, node: Node) -> Cache | None:
        if node.cache is False:
            return None
        return node.cache or self.cache


def _check(cluster: Cluster, where: str, base: Path) -> None:
    seen_names: dict[str, int] = {}
    seen_macs: dict[str, int] = {}
    seen_addresses: dict[str, int] = {}
    for i, node in enumerate(cluster.nodes):
        if node.address and node.address in seen_addresses:
            raise RecipeError(f"{where}: nodes[{i}].address: {node.address} is already "
                              f"nodes[{seen_addresses[node.address]}]", "every node has its own address")
        if node.address:
            seen_addresses[node.address] = i
        if node.name in seen_names:
            raise RecipeError(f"{where}: nodes[{i}].name: {node.name!r} is already nodes[{seen_names[node.name]}]")
        if node.mac in seen_macs:
            raise RecipeError(f"{where}: nodes[{i}].mac: {node.mac} is already nodes[{seen_macs[node.mac]}]")
        seen_names[node.name], seen_macs[node.mac] = i, i
        _check_vllm(node, f"{where}: nodes[{i}]", base)
        select(node.target, node.variant, f"{where}: nodes[{i}]")
        if node.target not in KERNELS:
            raise RecipeError(f"{where}: nodes[{i}].target: {node.target} cannot be netbooted yet",
                              f"netboot targets: {', '.join(KERNELS)}")
    heads = [i for i, n in enumerate(cluster.nodes) if n.role == "head"]
    if len(heads) > 1:
        raise RecipeError(f"{where}: nodes[{heads[1]}].role: only one head per cluster (nodes[{heads[0]}] is one)")
    if heads:
        if not cluster.model:
            raise RecipeError(f"{where}: model: the head (nodes[{heads[0]}]) needs a model",
                              "model: /srv/models/NAME.gguf (served by `builder pxe serve`) or an http URL")
        if not cluster.model.startswith("http://"):
            model = base / cluster.model
            if not model.is_file():
                raise RecipeError(f"{where}: model: {cluster.model} is not a file",
                                  "give a GGUF file on the control node, or an http:// URL")
            # The file is published over HTTP to every node: only a model, never any other file of this machine.
            with model.open("rb") as f:
                if f.read(4) != GGUF_MAGIC:
                    raise RecipeError(f"{where}: model: {cluster.model} is not a GGUF file",
                                      "give a .gguf model file; nothing else is published to the nodes")
        for i, node in enumerate(cluster.nodes):
            if node.role == "rpc-worker" and not node.address:
                raise RecipeError(f"{where}: nodes[{i}].address: the head needs every worker's address",
                                  "reserve an address for the node in your DHCP server and write it here")


def _check_vllm(node: Node, where: str, base: Path) -> None:
    if (node.role == "vllm-server") != (node.vllm is not None):
        raise RecipeError(f"{where}.vllm: a vllm-server node needs `vllm:` (its model), and only it has one",
                          "vllm: {model: /srv/models/NAME, served_name: NAME}")
    if node.vllm is None:
        return
    folder = base / node.vllm.model
    # The folder is published over HTTP to the node: only a model folder, never any other part of this machine.
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise RecipeError(f"{where}.vllm.model: {node.vllm.model} is not a Hugging Face model folder",
                          "give a folder with a config.json naming its model_type; nothing else is published")


def load_inventory(path: Path) -> Cluster:
    """A validated cluster.yaml; every problem is one line naming the file and the field."""
    where = display_path(path)
    cluster = validated(Cluster, path, load_yaml(path, "cluster", "pass the path of your cluster.yaml"))
    _check(cluster, where, path.parent)
    return cluster
