"""What netboot knows of a cluster file: the control node, a node's hardware facts (name, MAC, address, kernel
words, cache disk), validated like recipes. The cluster file itself, with each node's target or devices, is
builder/cluster/model.py's."""

import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from builder.core.types import Address, CacheDevice, HostName, InterfaceName, Ipv4, KernelArg
from builder.recipe.models import Strict

_MAC = re.compile(r"([0-9a-f]{2})([:-][0-9a-f]{2}){5}")
GGUF_MAGIC = b"GGUF"


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


class Node(Strict):
    """One compute node, found by the MAC address it netboots from."""

    name: HostName = Field(description="host name (lowercase letters, digits, '-')")
    mac: str | None = Field(None, description="MAC address of the boot interface, e.g. 52:54:00:12:34:56; "
                            "without one builder does not boot the node (see `builder cluster commands`)")
    address: Address | None = Field(None, description="the node's reserved address (peers, the gateway and the "
                                    "firewall reach it there)")
    kernel_args: list[KernelArg] = Field(default_factory=list, description="extra kernel command-line words")
    cache: Cache | Literal[False] | None = Field(
        None, description="this node's cache disk (default: the cluster's `cache`); false: none, RAM mode")

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
    def _mac(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.lower()
        if not _MAC.fullmatch(value):
            raise ValueError("must be six hex pairs separated by ':' or '-', e.g. 52:54:00:12:34:56")
        return value.replace("-", ":")

    @property
    def file_stem(self) -> str:
        """How iPXE's ${mac:hexhyp} spells the MAC: the node's boot script is nodes/<stem>.ipxe."""
        assert self.mac is not None, "only a netbooted node has a boot script"
        return self.mac.replace(":", "-")
