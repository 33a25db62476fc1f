"""builder's own small initramfs: busybox, the network and root-filesystem modules, and our /init.

Why not Debian live-boot or dracut: live-boot downloads the root once with no checksum, dracut brings a
systemd we do not otherwise need, and both took minutes to boot under emulation; this one is a few MB,
checks the root's sha256 before mounting it and starts in seconds (see docs/netboot.md). It also carries
Debian's dmsetup (with its libraries and the loader) to open the root through dm-verity, Debian's nft with
the nf_tables modules to load the node's firewall before the role starts, and cache.sh, the functions that
find, check and format the node's cache disk.
"""

from pathlib import Path

from builder.core.errors import EngineError
from builder.netboot import cpio
from builder.netboot.elf import closure
from builder.netboot.kernels import (
    FIREWALL_MODULES,
    INITRD_FIRMWARE,
    NET_MODULES,
    ROOT_MODULES,
    busybox,
    firmware_dir,
)
from builder.netboot.modules import load_order, module_bytes, plain_name
from builder.render.context import IMAGES_DIR

NODE_SCRIPTS = IMAGES_DIR / "netboot"


def initramfs(kernel_tree: Path, moddir: Path) -> tuple[bytes, list[str]]:
    """The gzipped newc initramfs, and the wanted modules this kernel lacks (for the build report)."""
    order, missing = load_order(moddir, NET_MODULES + ROOT_MODULES + FIREWALL_MODULES)
    entries = [cpio.directory(d) for d in ("bin", "dev", "etc", "etc/builder", "lib", "lib/modules", "proc",
                                           "run", "sys", "tmp", "newroot", "sbin", "lib64",
                                           "lib/x86_64-linux-gnu")]
    entries += [cpio.chardev("dev/console", 5, 1), cpio.chardev("dev/null", 1, 3, 0o666),
                cpio.file("bin/busybox", busybox(kernel_tree).read_bytes(), 0o755),
                cpio.file("init", (NODE_SCRIPTS / "init.sh").read_bytes(), 0o755),
                cpio.file("etc/builder/udhcpc.sh", (NODE_SCRIPTS / "udhcpc.sh").read_bytes(), 0o755),
                cpio.file("etc/builder/cache.sh", (NODE_SCRIPTS / "cache.sh").read_bytes(), 0o644)]
    entries += _programs(kernel_tree, ("dmsetup", "nft"))
    # nft resolves protocol names (icmp, ipv6-icmp) through /etc/protocols (Debian's netbase)
    protocols = kernel_tree / "etc/protocols"
    if not protocols.is_file():
        raise EngineError(f"no etc/protocols in {kernel_tree}",
                          "remove the kernel tree from the cache to fetch it again")
    entries.append(cpio.file("etc/protocols", protocols.read_bytes()))
    names = [plain_name(path) for path in order]
    entries += [cpio.file(f"lib/modules/{name}", module_bytes(moddir / path))
                for path, name in zip(order, names, strict=True)]
    entries.append(cpio.file("etc/builder/modules", "".join(f"{n}\n" for n in names).encode()))
    entries += _firmware(firmware_dir(kernel_tree))
    return cpio.gzipped(cpio.archive(entries)), missing


def _programs(tree: Path, names: tuple[str, ...]) -> list[cpio.Entry]:
    """sbin/NAME for each program (Debian's dmsetup and nftables packages in the kernel tree), the libraries
    they need and the loader, each library once."""
    entries = []
    libraries: dict[str, Path] = {}
    for name in names:
        program = next((p for p in (tree / "sbin" / name, tree / "usr/sbin" / name) if p.is_file()), None)
        if program is None:
            raise EngineError(f"no {name} in {tree}", "remove the kernel tree from the cache to fetch it again")
        entries.append(cpio.file(f"sbin/{name}", program.read_bytes(), 0o755))
        libraries.update(closure(tree, program))
    for soname, path in sorted(libraries.items()):
        folder = "lib64" if soname.startswith("ld-linux") else "lib/x86_64-linux-gnu"
        entries.append(cpio.file(f"{folder}/{soname}", path.read_bytes(), 0o755))
    return entries


def _firmware(source: Path) -> list[cpio.Entry]:
    """lib/firmware/<name> for each of INITRD_FIRMWARE the kernel tree holds (a link read as the file it names),
    with the folders above it."""
    entries: list[cpio.Entry] = []
    folders: set[str] = set()
    for name in INITRD_FIRMWARE:
        blob = source / name
        if not blob.is_file():
            continue
        parts = f"lib/firmware/{name}".split("/")
        for depth in range(2, len(parts)):
            folder = "/".join(parts[:depth])
            if folder not in folders:
                folders.add(folder)
                entries.append(cpio.directory(folder))
        entries.append(cpio.file(f"lib/firmware/{name}", blob.read_bytes()))
    return entries

