"""builder's own small initramfs: busybox, the network and root-filesystem modules, and our /init.

Why not Debian live-boot or dracut: live-boot downloads the root once with no checksum, dracut brings a
systemd we do not otherwise need, and both took minutes to boot under emulation; this one is a few MB,
checks the root's sha256 before mounting it and starts in seconds (see docs/netboot.md). It also carries
Debian's dmsetup (with its libraries and the loader) to open the root through dm-verity, and cache.sh, the
functions that find, check and format the node's cache disk.
"""

from pathlib import Path

from builder.errors import EngineError
from builder.netboot import cpio
from builder.netboot.elf import closure
from builder.netboot.kernels import NET_MODULES, ROOT_MODULES, busybox
from builder.netboot.modules import load_order, module_bytes, plain_name
from builder.render import IMAGES_DIR

NODE_SCRIPTS = IMAGES_DIR / "netboot"


def initramfs(kernel_tree: Path, moddir: Path) -> tuple[bytes, list[str]]:
    """The gzipped newc initramfs, and the wanted modules this kernel lacks (for the build report)."""
    order, missing = load_order(moddir, NET_MODULES + ROOT_MODULES)
    entries = [cpio.directory(d) for d in ("bin", "dev", "etc", "etc/builder", "lib", "lib/modules", "proc",
                                           "run", "sys", "tmp", "newroot", "sbin", "lib64",
                                           "lib/x86_64-linux-gnu")]
    entries += [cpio.chardev("dev/console", 5, 1), cpio.chardev("dev/null", 1, 3, 0o666)]
    entries.append(cpio.file("bin/busybox", busybox(kernel_tree).read_bytes(), 0o755))
    entries.append(cpio.file("init", (NODE_SCRIPTS / "init.sh").read_bytes(), 0o755))
    entries.append(cpio.file("etc/builder/udhcpc.sh", (NODE_SCRIPTS / "udhcpc.sh").read_bytes(), 0o755))
    entries.append(cpio.file("etc/builder/cache.sh", (NODE_SCRIPTS / "cache.sh").read_bytes(), 0o644))
    entries += _dmsetup(kernel_tree)
    names = []
    for path in order:
        name = plain_name(path)
        entries.append(cpio.file(f"lib/modules/{name}", module_bytes(moddir / path)))
        names.append(name)
    entries.append(cpio.file("etc/builder/modules", "".join(f"{n}\n" for n in names).encode()))
    return cpio.gzipped(cpio.archive(entries)), missing


def _dmsetup(tree: Path) -> list[cpio.Entry]:
    """sbin/dmsetup, the libraries it needs and the loader, from the kernel tree (Debian's dmsetup package)."""
    program = next((p for p in (tree / "sbin/dmsetup", tree / "usr/sbin/dmsetup") if p.is_file()), None)
    if program is None:
        raise EngineError(f"no dmsetup in {tree}", "remove the kernel tree from the cache to fetch it again")
    entries = [cpio.file("sbin/dmsetup", program.read_bytes(), 0o755)]
    for soname, path in sorted(closure(tree, program).items()):
        folder = "lib64" if soname.startswith("ld-linux") else "lib/x86_64-linux-gnu"
        entries.append(cpio.file(f"{folder}/{soname}", path.read_bytes(), 0o755))
    return entries
