"""Which kernel, modules and firmware a netbooted node of each target gets, and fetching them from Debian.

The kernel is Debian's own `linux-image-amd64` of a chosen suite, extracted (not installed: no maintainer
scripts run) with mmdebstrap's `extract` variant and cached by its inputs, like bootstrapped bases.
"""

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from builder.core.errors import EngineError, RecipeError
from builder.core.locks import lock_file, locked
from builder.core.paths import cache_subdir
from builder.core.run import run, run_logged
from builder.engines.cleanup import temp_dir
from builder.plan.bases import host_arch

KERNEL_VERSION = "4"  # bump when the way kernel trees are made changes

# Loaded by the initramfs: enough to reach the control node and mount the root. Missing ones are skipped,
# so one list serves every kernel. Ethernet drivers are those of the boards in our clusters (Realtek,
# Intel, Aquantia/Marvell 5/10 GbE, Mellanox ConnectX) plus virtio for virtual machines.
NET_MODULES = ("virtio_pci", "virtio_net", "e1000", "e1000e", "igb", "igc", "r8169", "atlantic", "ixgbe",
               "mlx5_core", "thunderbolt_net")
# The root: a squashfs on a loop device, opened through dm-verity, under an overlay; the cache disk: ext4
# (which mounts the ext2 that busybox's mke2fs writes) on virtio, NVMe or SATA.
# (ext4 asks the crypto API for crc32c, which no modprobe can load in the initramfs: load it first)
ROOT_MODULES = ("loop", "squashfs", "overlay", "dm_mod", "dm_verity", "crc32c_generic", "ext4", "virtio_blk",
                "nvme", "ahci", "sd_mod")
# The node's firewall (nftables rules from the inventory), loaded by the initramfs before the role starts. The
# initramfs has no modprobe, so every module the rules use is loaded up front: nf_tables (sets, meta, payload
# and the inet family are built in), conntrack for `ct state`, and the reject expressions.
FIREWALL_MODULES = ("nf_tables", "nft_ct", "nft_reject_inet")


@dataclass(frozen=True)
class KernelSpec:
    """A Debian kernel for netbooted nodes of one target."""

    suite: str
    min_version: tuple[int, int]  # what the target's drivers need; checked against the fetched kernel
    why: str  # the reason for the suite, shown in docs and `pxe build` output
    components: tuple[str, ...] = ("main",)
    firmware_packages: tuple[str, ...] = ()
    firmware_globs: tuple[str, ...] = ()  # paths under lib/firmware shipped in the root (all of it if empty)
    accel_modules: tuple[str, ...] = ()  # loaded after switching to the root, where their firmware is
    mirror: str = ""

    def key(self) -> str:
        inputs = {"v": KERNEL_VERSION, "arch": host_arch(), **asdict(self)}
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()

    @property
    def packages(self) -> tuple[str, ...]:
        # dmsetup opens the root through dm-verity in the initramfs (busybox has no device-mapper applet);
        # nft loads the node's firewall there (netbase: the /etc/protocols it reads names like icmp from)
        return ("linux-image-amd64", "busybox-static", "dmsetup", "nftables", "netbase", *self.firmware_packages)


_NONFREE = ("main", "non-free-firmware")

KERNELS: dict[str, KernelSpec] = {
    "cpu": KernelSpec("bookworm", (5, 10), "any supported kernel runs the CPU backend; bookworm's 6.1 is stable"),
    "strix-halo": KernelSpec(
        "sid", (6, 16),
        "gfx1151 needs a recent amdgpu (6.16 or later recommended for Strix Halo's unified memory); "
        "only sid carries one",
        components=_NONFREE, firmware_packages=("firmware-amd-graphics",), firmware_globs=("amdgpu/*",),
        accel_modules=("amdgpu",)),
    "intel-arc": KernelSpec(
        "trixie", (6, 2), "Arc A770 (DG2) is supported by i915 since 6.2; trixie ships 6.12",
        components=_NONFREE, firmware_packages=("firmware-intel-graphics",),
        firmware_globs=("i915/dg2_*", "i915/*guc*", "i915/*huc*"), accel_modules=("i915",)),
    "intel-npu": KernelSpec(
        "trixie", (6, 8), "intel_vpu drives Meteor Lake NPUs since 6.3 and Lunar Lake since 6.8; trixie ships 6.12",
        components=_NONFREE, firmware_packages=("firmware-intel-misc",), firmware_globs=("intel/vpu/*",),
        accel_modules=("intel_vpu",)),
}


def kernel_spec(target: str) -> KernelSpec:
    spec = KERNELS.get(target)
    if spec is None:
        if target == "nvidia":
            raise RecipeError(
                "netboot is not available for nvidia: its kernel driver is not part of Debian's kernel packages",
                "run nvidia nodes from a disk install with the NVIDIA driver and `builder run`")
        raise RecipeError(f"no netboot kernel for target {target!r}", f"netboot targets: {', '.join(KERNELS)}")
    return spec


def _extract_argv(spec: KernelSpec, out: Path) -> list[str]:
    argv = ["mmdebstrap", "--variant=extract", "--mode=root", "--format=directory",
            f"--architectures={host_arch()}", f"--components={','.join(spec.components)}",
            "--aptopt=Acquire::Languages \"none\"",
            # sid's Release file is valid for a week only: a lagging mirror must not stop the fetch
            # (signatures are still checked)
            "--aptopt=Acquire::Check-Valid-Until \"false\"", "--include=" + ",".join(spec.packages),
            "--", spec.suite, str(out)]
    if spec.mirror:
        argv.append(spec.mirror)
    return argv


def fetch_kernel_tree(spec: KernelSpec) -> Path:
    """A folder holding the extracted kernel packages (boot/, lib/modules, lib/firmware, busybox)."""
    trees = cache_subdir("netboot") / "kernels"
    trees.mkdir(parents=True, exist_ok=True)
    tree = trees / f"{spec.suite}-{spec.key()[:16]}"
    if (tree / ".complete").is_file():
        return tree
    if not shutil.which("mmdebstrap"):
        raise EngineError("mmdebstrap is not installed; it fetches the netboot kernel from Debian packages",
                          "apt-get install mmdebstrap")
    if os.geteuid() != 0:
        raise EngineError("fetching the netboot kernel needs root (mmdebstrap --mode=root)", "run builder as root")
    with locked(lock_file(f"kernel-{spec.key()}"), f"fetching the {spec.suite} kernel"), temp_dir(trees) as tmp:
        if (tree / ".complete").is_file():
            return tree
        run_logged(_extract_argv(spec, tmp / "root"), trees / f"{tree.name}.log",
                   title=f"fetch {spec.suite} kernel ({', '.join(spec.packages)})")
        # extract makes no merged-/usr links and runs no maintainer scripts: add the link depmod
        # looks through, and make the module index here
        extracted = tmp / "root"
        if (extracted / "usr/lib/modules").is_dir() and not (extracted / "lib").exists():
            (extracted / "lib").symlink_to("usr/lib")
        run(["depmod", "-b", str(tmp / "root"), "--", kernel_version(tmp / "root")])
        (tmp / "root" / ".complete").touch()
        shutil.rmtree(tree, ignore_errors=True)
        os.replace(tmp / "root", tree)
    return tree


def _kernels(tree: Path) -> dict[str, Path]:
    """version -> kernel image: /boot/vmlinuz-V (bookworm, trixie) or /usr/lib/modules/V/vmlinuz (newer)."""
    found = {p.name.removeprefix("vmlinuz-"): p for p in (tree / "boot").glob("vmlinuz-*")}
    for base in (tree / "lib/modules", tree / "usr/lib/modules"):
        found.update({p.parent.name: p for p in base.glob("*/vmlinuz")})
    return found


def kernel_version(tree: Path) -> str:
    """The version of the one kernel in an extracted tree, e.g. 6.1.0-50-amd64."""
    found = _kernels(tree)
    if len(found) != 1:
        raise EngineError(f"expected one kernel in {tree}, found {sorted(found) or 'none'}")
    return next(iter(found))


def kernel_image(tree: Path, version: str) -> Path:
    return _kernels(tree)[version]


def busybox(tree: Path) -> Path:
    for candidate in (tree / "bin/busybox", tree / "usr/bin/busybox"):
        if candidate.is_file():
            return candidate
    raise EngineError(f"no busybox in {tree}", "the kernel tree includes busybox-static; remove it to fetch again")


def version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def modules_dir(tree: Path, version: str) -> Path:
    for candidate in (tree / "lib/modules" / version, tree / "usr/lib/modules" / version):
        if candidate.is_dir():
            return candidate
    raise EngineError(f"no modules for kernel {version} in {tree}")


def firmware_dir(tree: Path) -> Path:
    for candidate in (tree / "lib/firmware", tree / "usr/lib/firmware"):
        if candidate.is_dir():
            return candidate
    return tree / "lib/firmware"
