"""`admins:` of a cluster file: the operators' SSH public keys, the addresses they connect from, their ports.

With keys given, every netbooted node runs an ssh server (key-only login, as root) on its own address and
port `ssh_port` and a Prometheus exporter on `metrics_port`, and its firewall admits exactly `addresses` on
exactly those ports (builder/netboot/firewall.py).
The keys reach the node in its plan, which is served to the boot network: public keys only, never a secret.

A key is one line of an authorized_keys file without options: `TYPE BASE64 [COMMENT]`. Options (`command=`,
`from=`, ...), a second line or control characters are refused, and the base64 blob must decode and name
the same type as the line, so nothing but a key reaches the node's authorized_keys. The comment stays in
the file (it names the key's owner) and never reaches the node.
"""

import base64
import binascii
import ipaddress
import re
import struct
from typing import Annotated

from pydantic import AfterValidator, Field, model_validator

from builder.recipe.models import Strict

# The key types OpenSSH's sshd accepts today (ssh-dss is gone from OpenSSH 10, ssh-rsa's SHA-1 signatures are
# off by default, but an RSA key signs with rsa-sha2-256/512 and stays a key of type ssh-rsa).
KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
             "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com", "ssh-rsa")
MIN_RSA_BITS = 2048
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_COMMENT = re.compile(r"[\x21-\x7e]( ?[\x21-\x7e])*")


def _rsa_bits(blob: bytes, at: int) -> int:
    """The modulus size of an ssh-rsa blob, read after its type string (`at`): mpint e, then mpint n."""
    for _ in range(2):
        size, = struct.unpack_from(">I", blob, at)
        value, at = blob[at + 4:at + 4 + size], at + 4 + size
    return len(value.lstrip(b"\0")) * 8


def check_key(value: str) -> str:
    """One public key line, `TYPE BASE64 [COMMENT]`, checked: a known type, base64 that decodes to a blob of
    that type, a plain comment; options and line breaks are refused."""
    if any(ord(c) < 0x20 or ord(c) == 0x7f for c in value):
        raise ValueError("a public key is one line without control characters (one key per list item)")
    words = value.strip().split(" ")
    if not words or words[0] not in KEY_TYPES:
        shown = words[0][:40] if words else ""
        raise ValueError(f"starts with {shown!r}, not a key type ({', '.join(KEY_TYPES)}); authorized_keys "
                         "options (command=, from=, ...) are not taken: give the key alone, `TYPE BASE64 COMMENT`")
    if len(words) < 2 or not _BASE64.fullmatch(words[1]):
        raise ValueError("the key's second word must be its base64 blob")
    try:
        blob = base64.b64decode(words[1], validate=True)
        size, = struct.unpack_from(">I", blob, 0)
    except (binascii.Error, struct.error):
        raise ValueError("the key's base64 blob does not decode") from None
    if blob[4:4 + size].decode("ascii", "replace") != words[0] or len(blob) < 4 + size + 8:
        raise ValueError(f"the key's blob is not a {words[0]} key (its type or length disagrees with the line)")
    if words[0] == "ssh-rsa":
        try:
            bits = _rsa_bits(blob, 4 + size)
        except struct.error:
            raise ValueError("the ssh-rsa key's blob is cut short") from None
        if bits < MIN_RSA_BITS:
            raise ValueError(f"an RSA key of {bits} bits is too weak (at least {MIN_RSA_BITS}); prefer ssh-ed25519")
    comment = " ".join(words[2:])
    if comment and not _COMMENT.fullmatch(comment):
        raise ValueError("the key's comment holds characters a key line does not")
    return " ".join(words[:2] + ([comment] if comment else []))


def _network(value: str) -> str:
    """An IP address or a CIDR network (host bits clear), in its normal form; never every address."""
    if any(ord(c) < 0x21 or ord(c) == 0x7f for c in value) or "%" in value:
        raise ValueError("an IP address or network (e.g. 192.168.1.20 or 192.168.1.0/24), without spaces or zones")
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"an IP address or network (e.g. 192.168.1.20 or 192.168.1.0/24): {exc}") from None
    if network.prefixlen == 0:
        raise ValueError("is every address: name the operators' hosts or their network")
    return str(network.network_address if network.num_addresses == 1 else network)


SshKey = Annotated[str, AfterValidator(check_key)]
Network = Annotated[str, AfterValidator(_network)]


class Admins(Strict):
    """Operators: who may log in to the netbooted nodes (by key only) and from where."""

    keys: list[SshKey] = Field(min_length=1, description="SSH public keys allowed to log in as root, each "
                               "`TYPE BASE64 COMMENT` as in a .pub file (no authorized_keys options)")
    addresses: list[Network] = Field(min_length=1, description="the operators' addresses or networks, e.g. "
                                     "192.168.1.20 or 192.168.1.0/24: the node's firewall admits exactly these on "
                                     "ssh_port")
    ssh_port: int = Field(22, ge=1, le=65535, description="the port each node's ssh server listens on")
    metrics_port: int = Field(9100, ge=1, le=65535, description="the port each node's Prometheus exporter "
                              "(prometheus-node-exporter: GPU use and memory, power, CPU, memory) listens on")

    @model_validator(mode="after")
    def _two_ports(self) -> "Admins":
        if self.metrics_port == self.ssh_port:
            raise ValueError(f"ssh_port and metrics_port are both {self.ssh_port}: give each its own port")
        return self

    @property
    def key_blobs(self) -> list[tuple[str, str]]:
        """(type, base64) of each key: what reaches the node (the comments stay in the file)."""
        return [(key.split(" ")[0], key.split(" ")[1]) for key in self.keys]

    @property
    def ports(self) -> tuple[int, ...]:
        """The ports the firewall opens to `addresses`: the ssh server's and the exporter's."""
        return (self.ssh_port, self.metrics_port)
