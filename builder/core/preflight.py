"""The control node's tools, checked before a verb does any work: every one missing is named at once, with
the one `apt-get install` line that brings them (Debian and Ubuntu package names)."""

import shutil
from collections.abc import Sequence

from builder.core.errors import EngineError

# program -> the Debian/Ubuntu package that has it
PACKAGES = {
    "mmdebstrap": "mmdebstrap",  # bootstraps bases (the images a netboot set is made from)
    "mksquashfs": "squashfs-tools",
    "veritysetup": "cryptsetup-bin",  # the root's dm-verity tree
    "depmod": "kmod",
    "zstd": "zstd",
    "dpkg-deb": "dpkg",
    "haproxy": "haproxy",  # the gateway
    "kill": "procps",  # the gateway unit's reload
    "dnsmasq": "dnsmasq-base",  # proxy-DHCP and TFTP
    "nft": "nftables",
    "etherwake": "etherwake",  # Wake-on-LAN on the boot interface
    "ssh": "openssh-client",  # `cluster reboot`: the operator's own ssh client
}
# What each verb runs on this machine (the container engine is checked on its own: podman or docker).
NETBOOT_SET = ("mmdebstrap", "mksquashfs", "veritysetup", "depmod", "zstd", "dpkg-deb")
GATEWAY = ("haproxy",)
GATEWAY_UNIT = ("haproxy", "kill")
DHCP = ("dnsmasq",)


def require_tools(verb: str, tools: Sequence[str]) -> None:
    """One line naming every tool `verb` needs that this machine lacks, and the one line that installs them."""
    missing = [tool for tool in dict.fromkeys(tools) if shutil.which(tool) is None]
    if missing:
        packages = " ".join(dict.fromkeys(PACKAGES[tool] for tool in missing))
        raise EngineError(f"{verb} needs {', '.join(missing)}, which this machine does not have",
                          f"apt-get install {packages}")
