"""What netboot knows of a cluster file: the control node, a node's hardware facts (name, MAC, address, kernel
words, cache disk, MTU, its data interface), validated like recipes. The cluster file itself, with each node's
target or devices, is builder/cluster/model.py's."""

import ipaddress
import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from builder.core.types import Address, CacheDevice, HostName, InterfaceName, Ipv4, KernelArg
from builder.recipe.models import Strict

_MAC = re.compile(r"([0-9a-f]{2})([:-][0-9a-f]{2}){5}")
GGUF_MAGIC = b"GGUF"
# An interface's MTU: from IPv6's minimum to the largest a Linux network driver takes (thunderbolt-net's 65520);
# jumbo frames on Ethernet are 9000 (check the switch and both NICs take it).
MTU_MIN, MTU_MAX = 1280, 65520


def _sexagesimal(value: object) -> object:
    """YAML 1.1 reads an unquoted all-digit MAC such as 52:54:00:12:34:56 as a base-60 number; every pair is then
    below 60, so the pairs can be recovered exactly."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        pairs = []
        for _ in range(6):
            value, pair = divmod(value, 60)
            pairs.append(f"{pair:02d}")
        return ":".join(reversed(pairs)) if value == 0 else str(value)
    return value


def _mac(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.lower()
    if not _MAC.fullmatch(value):
        raise ValueError("must be six hex pairs separated by ':' or '-', e.g. 52:54:00:12:34:56")
    return value.replace("-", ":")


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


class DataInterface(Strict):
    """A node's second network interface: the fast link (25-50 GbE, Thunderbolt networking) its RPC workers and
    pipeline peers use. The initramfs configures it with a static address, beside the boot interface."""

    name: InterfaceName | None = Field(None, description="the interface by name, e.g. enp2s0f0 (or mac:)")
    mac: str | None = Field(None, description="the interface by MAC address, e.g. 52:54:00:ab:cd:ef (or name:)")
    address: str = Field(description="its static address with the network's prefix length, e.g. 10.10.0.11/24 "
                         "(nothing on the data network routes: peers share this network)")
    mtu: int | None = Field(None, ge=MTU_MIN, le=MTU_MAX, description="its MTU, e.g. 9000 for jumbo frames "
                            "(default: the driver's, usually 1500); every peer on the link needs the same")

    _sexagesimal = field_validator("mac", mode="before")(lambda cls, value: _sexagesimal(value))
    _mac = field_validator("mac")(lambda cls, value: _mac(value))

    @field_validator("address")
    @classmethod
    def _cidr(cls, value: str) -> str:
        if "%" in value:
            raise ValueError("has a zone (%NAME): give an address without one")
        if "/" not in value:
            raise ValueError("must be an address with its prefix length, e.g. 10.10.0.11/24")
        try:
            interface = ipaddress.ip_interface(value)
        except ValueError:
            raise ValueError("must be an IP address with its prefix length, e.g. 10.10.0.11/24") from None
        ip, network = interface.ip, interface.network
        if ip.is_unspecified or ip.is_loopback or ip.is_multicast:
            raise ValueError(f"{ip} is not an address a network interface can hold")
        if network.num_addresses > 2 and ip in (network.network_address, network.broadcast_address):
            raise ValueError(f"{ip} is the {'network' if ip == network.network_address else 'broadcast'} address of "
                             f"{network}; give a host's address")
        return str(interface)

    @model_validator(mode="after")
    def _one_way(self) -> "DataInterface":
        if (self.name is None) == (self.mac is None):
            raise ValueError("give the interface by name: or by mac:, one of the two")
        return self

    @property
    def ip(self) -> str:
        """The address alone (what peers connect to and processes bind)."""
        return str(ipaddress.ip_interface(self.address).ip)

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_interface(self.address).network

    @property
    def words(self) -> list[str]:
        """What the node's kernel command line carries for it (images/netboot/init.sh reads them)."""
        found = f"builder.data_mac={self.mac}" if self.mac else f"builder.data_if={self.name}"
        return [found, f"builder.data_address={self.address}",
                *([f"builder.data_mtu={self.mtu}"] if self.mtu else [])]


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

    mtu: int | None = Field(None, ge=MTU_MIN, le=MTU_MAX, description="MTU of the boot interface (default: the "
                            "driver's, usually 1500)")
    data_interface: DataInterface | None = Field(
        None, description="a second, fast network for RPC and pipeline traffic: {name: IFACE or mac: MAC, address: "
        "IP/PREFIX, mtu: 9000} (docs/netboot.md, The data network)")

    _sexagesimal = field_validator("mac", mode="before")(lambda cls, value: _sexagesimal(value))
    _mac = field_validator("mac")(lambda cls, value: _mac(value))

    @property
    def peer_address(self) -> str | None:
        """Where its RPC workers and pipeline peers are reached: its data address, else its address."""
        return self.data_interface.ip if self.data_interface else self.address

    @property
    def network_words(self) -> list[str]:
        """The kernel command-line words of its boot interface's MTU and its data interface."""
        words = [f"builder.mtu={self.mtu}"] if self.mtu else []
        return words + (self.data_interface.words if self.data_interface else [])

    @property
    def file_stem(self) -> str:
        """How iPXE's ${mac:hexhyp} spells the MAC: the node's boot script is nodes/<stem>.ipxe."""
        assert self.mac is not None, "only a netbooted node has a boot script"
        return self.mac.replace(":", "-")
