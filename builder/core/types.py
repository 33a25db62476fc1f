"""Validated strings: every value from a recipe, inventory or lock that reaches argv, a shell line, a
Containerfile, an iPXE script, a kernel command line or a path is one of these types. No I/O here.

Each type is an `Annotated[str, …]` with a validator, so a pydantic model that uses it rejects a bad value
at load time with the field's name, and the code behind the loaders only ever sees checked values.
Patterns are matched whole with `re.fullmatch`: `$` in Python also matches before a final newline, which
is how a newline once slipped an extra instruction into a Containerfile.
"""

import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator

# C0 controls, DEL and the C1 range: none of these belongs in a name, a label or a command-line word.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SPACE = re.compile(r"\s")


def one_line(value: str) -> str:
    """Free text (a label value, an environment value) that stays on one line."""
    if _CONTROL.search(value) or "\u2028" in value or "\u2029" in value:
        raise ValueError("must be one line without control characters")
    return value


def _charset(pattern: str, what: str) -> AfterValidator:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"must be {what}")
        return value

    return AfterValidator(check)


OneLine = Annotated[str, AfterValidator(one_line)]
# Shell-safe names: nothing a shell, a Containerfile or a kernel command line treats specially.
BinaryName = Annotated[str, _charset(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}",
                                     "a program name: letters, digits and _ . + - (not starting with - or .)")]
EnvName = Annotated[str, _charset(r"[A-Za-z_][A-Za-z0-9_]{0,127}",
                                  "an environment variable name: letters, digits and _, not starting with a digit")]
CmakeName = Annotated[str, _charset(r"[A-Za-z_][A-Za-z0-9_]{0,127}",
                                    "a CMake variable name: letters, digits and _")]
LabelKey = Annotated[str, _charset(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}",
                                   "a label key: letters, digits and . _ / - (e.g. org.example.team)")]
DistName = Annotated[str, _charset(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,126}[A-Za-z0-9])?",
                                   "a Python distribution name: letters, digits and . _ -")]
# PEP 440 versions (and the local tags of vendor builds, e.g. 2.13.0+cpu); no wildcards, no shell characters.
Version = Annotated[str, _charset(r"[A-Za-z0-9][A-Za-z0-9.+!_-]{0,127}", "a version: letters, digits and . + ! _ -")]
# A word of a command the recipe names (an argument of a program), inert in a shell.
CommandWord = Annotated[str, _charset(r"[A-Za-z0-9_.,:=/+@%-]{1,255}",
                                      "a command word: letters, digits and _ . , : = / + @ % -")]
# Globs for files to ship: path characters and glob characters only, so they stay inert in double quotes.
_GLOB = r"[A-Za-z0-9._+*?\[\]{},@%=-]+"


def _glob_path(absolute: bool) -> AfterValidator:
    def check(value: str) -> str:
        parts = value.split("/")
        if absolute:
            if parts[0] != "" or len(parts) < 2:
                raise ValueError("must be an absolute path glob, e.g. /usr/lib/x86_64-linux-gnu/libfoo.so*")
            parts = parts[1:]
        elif parts[0] == "":
            raise ValueError("must be a relative path glob inside the SDK, without a leading /")
        for part in parts:
            if part in ("", ".", "..") or not re.fullmatch(_GLOB, part):
                raise ValueError("must be a path glob of letters, digits, _ . + - and * ? [ ] { } , @ % =, "
                                 "without '..' or empty parts")
        return value

    return AfterValidator(check)


ShipGlob = Annotated[str, _glob_path(absolute=True)]
RelativeGlob = Annotated[str, _glob_path(absolute=False)]


# --- URLs -------------------------------------------------------------------------------------------------

def _url(schemes: tuple[str, ...], local_paths: bool) -> Callable[[str], str]:
    """A URL with an allowed scheme and a host; with `local_paths`, also an absolute path on this machine."""

    def check(value: str) -> str:
        if _CONTROL.search(value) or _SPACE.search(value):
            raise ValueError("must not contain spaces or control characters")
        if local_paths and value.startswith("/"):
            return value
        parts = urlsplit(value)
        allowed = ", ".join(f"{s}://" for s in schemes) + (" or an absolute path" if local_paths else "")
        if parts.scheme not in schemes:
            raise ValueError(f"must start with {allowed}")
        if parts.scheme != "file" and not parts.hostname:
            raise ValueError("must name a host, e.g. https://example.org/…")
        # A host that looks like an option (ssh://-oProxyCommand=…) must never reach a transport.
        if parts.hostname and not re.fullmatch(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9])?|[0-9a-f:.]+", parts.hostname):
            raise ValueError("must name a host of letters, digits, '.' and '-'")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ValueError("must have a numeric port") from None
        if parts.scheme == "file" and not parts.path.startswith("/"):
            raise ValueError("a file:// URL must hold an absolute path, e.g. file:///srv/llama.cpp")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials; use the tool's credential store instead")
        return value

    return check


http_url = _url(("https", "http"), local_paths=False)
HttpUrl = Annotated[str, AfterValidator(http_url)]
# git: the network transports plus local repositories (tests, mirrors); never ext:: or an option.
GitUrl = Annotated[str, AfterValidator(_url(("https", "http", "ssh", "git", "file"), local_paths=True))]
# An archive is downloaded over HTTP(S) or copied from a local path.
ArchiveUrl = Annotated[str, AfterValidator(_url(("https", "http"), local_paths=True))]
# A Debian archive: a mirror, a snapshot of one, or a local copy (file://, e.g. an offline mirror).
MirrorUrl = Annotated[str, AfterValidator(_url(("https", "http", "file"), local_paths=False))]
GitRef = Annotated[str, _charset(r"[A-Za-z0-9_][A-Za-z0-9_./+-]{0,254}",
                                 "a commit id, tag or branch: letters, digits and _ . / + -")]


# --- image references -------------------------------------------------------------------------------------

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*" \
          r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
_REFERENCE = re.compile(
    rf"(?:(?P<registry>{_DOMAIN})/)?(?P<name>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?")


@dataclass(frozen=True)
class ParsedImageRef:
    """An image reference split into its parts: [REGISTRY/]NAME[:TAG][@sha256:DIGEST]."""

    registry: str | None
    name: str
    tag: str | None
    digest: str | None


def parse_image_ref(text: str) -> ParsedImageRef:
    """The parts of a whole image reference; ValueError when any character is out of place."""
    match = _REFERENCE.fullmatch(text)
    if match is None:
        raise ValueError("must be an image reference [REGISTRY/]NAME[:TAG]@sha256:<64 hex digits> "
                         "(lowercase name; no spaces or other characters)")
    registry, name = match["registry"], match["name"]
    # docker's rule: a first component is a registry only if it has a '.', a ':' or is localhost.
    if registry is not None and not ("." in registry or ":" in registry or registry == "localhost"):
        if registry != registry.lower() or not re.fullmatch(_COMPONENT, registry):
            raise ValueError("must be an image reference: the first path part is neither a registry nor a name")
        name, registry = f"{registry}/{name}", None
    return ParsedImageRef(registry, name, match["tag"], match["digest"])


def _pinned_image_ref(value: str) -> str:
    if parse_image_ref(value).digest is None:
        raise ValueError("must be pinned by digest: NAME[:TAG]@sha256:<64 hex digits>")
    return value


def _image_ref(value: str) -> str:
    parse_image_ref(value)
    return value


PinnedImageRef = Annotated[str, AfterValidator(_pinned_image_ref)]
# Any well-formed reference (a bootstrapped base is local and has no digest): what a FROM line may hold.
ImageRef = Annotated[str, AfterValidator(_image_ref)]


# --- netboot ----------------------------------------------------------------------------------------------

def _kernel_word(value: str) -> str:
    # iPXE expands ${…} and splits on spaces before the kernel sees the line: keep to plain characters.
    if not re.fullmatch(r"[A-Za-z0-9_.,:=/+@%~-]+", value):
        raise ValueError("must be one kernel command-line word of letters, digits and _ . , : = / + @ % ~ - "
                         "(no spaces, quotes, $ or control characters)")
    if value.split("=", 1)[0].startswith("builder.") or value.split("=", 1)[0] in ("initrd", "BOOTIF"):
        raise ValueError("builder.*, initrd= and BOOTIF= are set by builder itself")
    return value


KernelArg = Annotated[str, AfterValidator(_kernel_word)]
HostName = Annotated[str, _charset(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?",
                                   "a host name: lowercase letters, digits and '-'")]
InterfaceName = Annotated[str, _charset(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,14}",
                                        "a network interface name, e.g. enp1s0")]


def _address(value: str) -> str:
    """An IP address (canonical form) or a DNS name."""
    if _CONTROL.search(value) or _SPACE.search(value):
        # ipaddress takes anything as an IPv6 zone id, a newline included
        raise ValueError("must be an IP address or a host name, without spaces or control characters")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    label = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    if not re.fullmatch(rf"{label}(?:\.{label})*", value) or len(value) > 253:
        raise ValueError("must be an IP address or a host name") from None
    return value


Address = Annotated[str, AfterValidator(_address)]


def is_wildcard(value: str) -> bool:
    """Whether `value` means every address to some parser: 0.0.0.0 or :: in any spelling inet_aton or
    ipaddress accepts (0, 0x0, 0.0, 000.000.000.000, ::0, [::], ::ffff:0.0.0.0, with a zone), `*` or `any`."""
    word = value.strip().lower()
    if word in ("*", "any", ""):
        return True
    word = word.removeprefix("[").removesuffix("]").partition("%")[0]
    try:
        ip = ipaddress.ip_address(word)
    except ValueError:
        try:
            return socket.inet_aton(word) == bytes(4)  # the C parser takes 0, 0x0, 0.0, 00.0.0 …
        except OSError:
            return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return ip.is_unspecified or (mapped is not None and mapped.is_unspecified)


def _ipv4_network(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError("must be an IPv4 network address, e.g. 192.168.50.0") from None


Ipv4 = Annotated[str, AfterValidator(_ipv4_network)]



def _cache_device(value: str) -> str:
    """A cache disk by a stable name, as the node's kernel command line carries it: `partlabel:NAME` for
    `PARTLABEL=NAME` (a GPT partition name), `id:NAME` for `/dev/disk/by-id/NAME`."""
    for prefix, kind in (("PARTLABEL=", "partlabel"), ("/dev/disk/by-id/", "id")):
        if value.startswith(prefix):
            name = value[len(prefix):]
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}", name):
                raise ValueError(f"{prefix}NAME: NAME must be letters, digits and _ . : + - (no spaces, no /)")
            return f"{kind}:{name}"
    raise ValueError("must be PARTLABEL=NAME (a GPT partition name) or /dev/disk/by-id/NAME: a stable name, "
                     "never /dev/sdX, which can change from one boot to the next")


CacheDevice = Annotated[str, AfterValidator(_cache_device)]
