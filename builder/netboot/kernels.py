"""Which kernel, modules and firmware a netbooted node of each target gets, and fetching them from Debian.

The kernel is Debian's own `linux-image-amd64` of a chosen suite with the target's firmware packages, pinned in
builder.lock (`netboot.<target>`: every .deb with its version, suite and sha256, resolved by `builder lock`).
`pxe build` fetches exactly those .debs (kept in the cache by sha256, checked on every use) and unpacks them
(not installed: no maintainer scripts run), like mmdebstrap's `extract` variant; the tree is cached by them.
"""

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from builder.core.errors import EngineError, LockError, RecipeError
from builder.core.locks import lock_file, locked
from builder.core.paths import cache_subdir
from builder.core.run import run
from builder.engines.cleanup import temp_dir
from builder.fetch.debian import AptSource, resolve_packages, suite_sources
from builder.fetch.debstore import DebStore
from builder.netboot.known_bad import refusals
from builder.plan.bases import host_arch
from builder.recipe.models import LockedBase

KERNEL_VERSION = "5"  # bump when the way kernel trees are made changes

# Loaded by the initramfs: enough to reach the control node, bring up a node's data network and mount the root.
# Missing ones are skipped, so one list serves every kernel. Ethernet drivers are those of the boards and data
# NICs the field uses: Realtek 1/2.5/5 GbE (r8169), Intel 1/2.5 GbE (e1000e, igb, igc), 10 GbE (ixgbe), 10/25/40 GbE
# X710/XXV710 (i40e) and 25/50/100 GbE E810 (ice), Aquantia/Marvell 5/10 GbE (atlantic), Broadcom NetXtreme-E
# 10–200 GbE (bnxt_en), Mellanox/NVIDIA ConnectX-4 and later (mlx5_core), Thunderbolt/USB4 networking
# (thunderbolt_net), plus virtio for virtual machines. Every one is loaded on every node: they bind only to the
# hardware they drive, and together they cost the initrd about a megabyte (docs/netboot.md).
NET_MODULES = ("virtio_pci", "virtio_net", "e1000", "e1000e", "igb", "igc", "r8169", "atlantic", "ixgbe",
               "i40e", "ice", "bnxt_en", "mlx5_core", "thunderbolt_net")
# Firmware the initramfs carries for those drivers, when the kernel tree has it (under lib/firmware): ice asks
# for its DDP package as it probes, in the initramfs, and without it runs in Safe Mode (one queue, no RSS) until
# the driver is loaded again. It comes from Debian's firmware-intel-misc, which only the kernels that pin that
# package carry (intel-npu's); i40e, bnxt_en, mlx5_core and the others need no file (their firmware is on the NIC).
INITRD_FIRMWARE = ("intel/ice/ddp/ice.pkg",)
# RPC over RDMA (an image built with `rpc_rdma: true`): the verbs interface (/dev/infiniband/uverbs*, rdma_cm)
# and the RDMA drivers of the data NICs above: ConnectX (mlx5_ib), E810 and X722 (irdma), Broadcom (bnxt_re).
# Loaded in the root after the NIC drivers, only in the netboot sets of such images; ones a kernel lacks are
# listed in the set's report (bookworm's 6.1 has no bnxt_re). Soft-RoCE (rdma_rxe) is left out: it turns any
# Ethernet NIC into a slow RDMA device, which is for tests, not for the data network.
RDMA_MODULES = ("ib_uverbs", "rdma_ucm", "mlx5_ib", "irdma", "bnxt_re")
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

    def lock_inputs(self) -> dict[str, Any]:
        """What the lock entry was resolved from: when these change, `builder lock` resolves the entry again."""
        inputs: dict[str, Any] = {"suite": self.suite, "components": list(self.components),
                                  "packages": sorted(self.packages)}
        if self.mirror:
            inputs["mirror"] = self.mirror
        return inputs

    def sources(self) -> list[AptSource]:
        return suite_sources(self.suite, self.components, self.mirror or None)


_NONFREE = ("main", "non-free-firmware")
# The Intel GPU generations the field runs, and the firmware each needs (linux-firmware's names, shipped by
# Debian's firmware-intel-graphics): Arc A-series (DG2: i915/dg2_*), Core Ultra 1xx Meteor Lake and 2xx Arrow
# Lake (i915, which treats Arrow Lake as a Meteor Lake: i915/mtl_*), Core Ultra 2xxV Lunar Lake and Arc B-series
# Battlemage (the xe driver: xe/lnl_*, xe/bmg_*, with their display firmware i915/xe2lpd_dmc, i915/bmg_dmc).
INTEL_GPU_FIRMWARE = ("i915/dg2_*", "i915/mtl_*", "i915/xe2lpd_*", "i915/bmg_*", "xe/lnl_*", "xe/bmg_*")
# Both drivers are loaded: each binds only the GPUs it drives by default (i915 up to Meteor/Arrow Lake and DG2,
# xe from Lunar Lake and Battlemage on).
INTEL_GPU_MODULES = ("i915", "xe")

KERNELS: dict[str, KernelSpec] = {
    "cpu": KernelSpec("bookworm", (5, 10), "any supported kernel runs the CPU backend; bookworm's 6.1 is stable"),
    "strix-halo": KernelSpec(
        "sid", (6, 16),
        "gfx1151 needs a recent amdgpu (6.16 or later recommended for Strix Halo's unified memory); "
        "only sid carries one",
        components=_NONFREE, firmware_packages=("firmware-amd-graphics",), firmware_globs=("amdgpu/*",),
        accel_modules=("amdgpu",)),
    "intel-arc": KernelSpec(
        "trixie", (6, 12),
        "Arc A770 (DG2) runs on i915 since 6.2; Lunar Lake and Battlemage need xe, whose support for them is "
        "complete in 6.12, which trixie ships",
        components=_NONFREE, firmware_packages=("firmware-intel-graphics",),
        firmware_globs=(*INTEL_GPU_FIRMWARE, "i915/*guc*", "i915/*huc*"), accel_modules=INTEL_GPU_MODULES),
    "intel-npu": KernelSpec(
        "trixie", (6, 8),
        "intel_vpu drives Meteor Lake NPUs since 6.3 and Lunar Lake since 6.8; trixie ships 6.12 (with xe for "
        "the Core Ultra iGPU beside the NPU)",
        components=_NONFREE, firmware_packages=("firmware-intel-misc", "firmware-intel-graphics"),
        firmware_globs=("intel/vpu/*", *INTEL_GPU_FIRMWARE), accel_modules=("intel_vpu", *INTEL_GPU_MODULES)),
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


LOCK_HINT = "run `builder lock` to pin it (resolved from Debian's archive), review the diff and commit builder.lock"
REFRESH_HINT = ("run `builder lock --refresh-netboot` to pin the archive's current kernel and firmware, review the "
                "diff and commit builder.lock")


def resolve_kernel(spec: KernelSpec) -> LockedBase:
    """The lock entry of a netboot kernel: its packages and their dependencies as the archive has them now."""
    return LockedBase(inputs=spec.lock_inputs(), resolved=resolve_packages(spec.sources(), host_arch(), spec.packages))


def pinned_version(entry: LockedBase, package: str) -> str | None:
    return next((deb.version for deb in entry.resolved if deb.name == package), None)


def pinned_kernel(target: str, spec: KernelSpec, entry: LockedBase | None, where: str) -> LockedBase:
    """The lock's entry for `target`'s netboot kernel, checked: resolved for this spec, and no known-bad version."""
    if entry is None:
        raise LockError(f"{where}: netboot.{target}: the kernel and firmware of {target} nodes are not pinned",
                        LOCK_HINT)
    if entry.inputs != spec.lock_inputs():
        raise LockError(f"{where}: netboot.{target}: pinned for other packages or suite than builder's "
                        f"({spec.suite}: {', '.join(spec.packages)})", LOCK_HINT)
    for package in ("linux-image-amd64", *spec.firmware_packages):
        if pinned_version(entry, package) is None:
            raise LockError(f"{where}: netboot.{target}: no {package} among the pinned packages", LOCK_HINT)
    versions = {deb.name: deb.version for deb in entry.resolved}
    refused = refusals(target, versions)
    if refused:
        rule = refused[0]
        raise LockError(f"{where}: netboot.{target}: {rule.package} {versions[rule.package]} is known bad for "
                        f"{target}: {rule.why}", f"{target} nodes need {rule.fix}: once {spec.suite} has one, run "
                        "`builder lock --refresh-netboot`, review the diff and commit builder.lock")
    return entry


def tree_key(entry: LockedBase) -> str:
    inputs = {"v": KERNEL_VERSION, "arch": host_arch(), "debs": sorted(deb.sha256 for deb in entry.resolved)}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def fetch_kernel_tree(spec: KernelSpec, entry: LockedBase, where: str = "builder.lock") -> Path:
    """A folder holding the pinned kernel packages unpacked (boot/, lib/modules, lib/firmware, busybox)."""
    trees = cache_subdir("netboot") / "kernels"
    trees.mkdir(parents=True, exist_ok=True)
    key = tree_key(entry)
    tree = trees / f"{spec.suite}-{key[:16]}"
    if (tree / ".complete").is_file():
        return tree
    with locked(lock_file(f"kernel-{key}"), f"fetching the {spec.suite} kernel"), temp_dir(trees) as tmp:
        if (tree / ".complete").is_file():
            return tree
        try:
            debs = DebStore(cache_subdir("debs")).fetch_all(entry.resolved, spec.sources(), where)
        except LockError as exc:  # the archive dropped a pinned version: pin the current ones
            raise LockError(exc.message, exc.hint if "reachable" in exc.hint else REFRESH_HINT) from None
        root = tmp / "root"
        root.mkdir()
        for deb in debs:  # what mmdebstrap's extract does: the files, no maintainer scripts
            run(["dpkg-deb", "--extract", "--", str(deb), str(root)], timeout=600)
        # unpacked packages make no merged-/usr links: add the one depmod looks through, and make the index
        if (root / "usr/lib/modules").is_dir() and not (root / "lib/modules").exists():
            if (root / "lib").is_dir() and not (root / "lib").is_symlink():
                (root / "lib/modules").symlink_to("../usr/lib/modules")
            elif not (root / "lib").exists():
                (root / "lib").symlink_to("usr/lib")
        run(["depmod", "-b", str(root), "--", kernel_version(root)])
        (root / ".complete").touch()
        shutil.rmtree(tree, ignore_errors=True)
        os.replace(root, tree)
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
