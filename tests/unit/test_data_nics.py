"""The drivers of the data network's NICs in the initramfs, ice's DDP package beside them, and the RDMA modules in
the root of a netboot set made from an image built with `rpc_rdma: true`.

The kernel tree is a made-up one shaped like Debian's (modules.dep of the 6.12 layout, module files whose bytes
name them), with the host's dmsetup and nft and their libraries, which the initramfs copies in.
"""

import gzip
import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from builder.netboot.artifacts import _add_node_files
from builder.netboot.initramfs import initramfs
from builder.netboot.kernels import KernelSpec

KVER = "6.12.0-test-amd64"
# module -> (its path under lib/modules/KVER, the modules it needs): Debian 6.12's layout, dependencies trimmed
MODULES = {
    "virtio_net": ("kernel/drivers/net/virtio_net.ko.xz", []),
    "r8169": ("kernel/drivers/net/ethernet/realtek/r8169.ko.xz", ["libphy"]),
    "libphy": ("kernel/drivers/net/phy/libphy.ko.xz", []),
    "igc": ("kernel/drivers/net/ethernet/intel/igc/igc.ko.xz", []),
    "atlantic": ("kernel/drivers/net/ethernet/aquantia/atlantic/atlantic.ko.xz", []),
    "i40e": ("kernel/drivers/net/ethernet/intel/i40e/i40e.ko.xz", ["libie"]),
    "ice": ("kernel/drivers/net/ethernet/intel/ice/ice.ko.xz", ["libie", "dpll"]),
    "libie": ("kernel/drivers/net/ethernet/intel/libie/libie.ko.xz", []),
    "dpll": ("kernel/drivers/dpll/dpll.ko.xz", []),
    "bnxt_en": ("kernel/drivers/net/ethernet/broadcom/bnxt/bnxt_en.ko.xz", []),
    "mlx5_core": ("kernel/drivers/net/ethernet/mellanox/mlx5/core/mlx5_core.ko.xz", []),
    "thunderbolt_net": ("kernel/drivers/net/thunderbolt/thunderbolt_net.ko.xz", ["thunderbolt"]),
    "thunderbolt": ("kernel/drivers/thunderbolt/thunderbolt.ko.xz", []),
    "ib_core": ("kernel/drivers/infiniband/core/ib_core.ko.xz", []),
    "ib_uverbs": ("kernel/drivers/infiniband/core/ib_uverbs.ko.xz", ["ib_core"]),
    "rdma_ucm": ("kernel/drivers/infiniband/core/rdma_ucm.ko.xz", ["ib_uverbs", "ib_core"]),
    "mlx5_ib": ("kernel/drivers/infiniband/hw/mlx5/mlx5_ib.ko.xz", ["mlx5_core", "ib_uverbs", "ib_core"]),
    "irdma": ("kernel/drivers/infiniband/hw/irdma/irdma.ko.xz", ["ice", "i40e", "ib_uverbs", "ib_core"]),
    # no bnxt_re: like bookworm's 6.1, this kernel lacks one of the RDMA drivers
}
DDP = b"ice DDP package\n" * 64


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    moddir = root / "lib/modules" / KVER
    lines = []
    for name, (path, deps) in MODULES.items():
        (moddir / path).parent.mkdir(parents=True, exist_ok=True)
        (moddir / path).write_bytes(lzma.compress(f"module {name}\n".encode()))
        lines.append(f"{path}: {' '.join(MODULES[d][0] for d in deps)}".rstrip())
    (moddir / "modules.dep").write_text("\n".join(lines) + "\n")
    (moddir / "modules.builtin").write_text("kernel/fs/overlayfs/overlay.ko\n")
    (root / "bin").mkdir()
    (root / "bin/busybox").write_bytes(b"busybox stand-in\n")
    (root / "sbin").mkdir()
    for program in ("dmsetup", "nft"):
        found = shutil.which(program)
        assert found, f"{program} is needed on this machine (the initramfs copies Debian's)"
        shutil.copy(found, root / "sbin" / program)
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/x86_64-linux-gnu").symlink_to("/usr/lib/x86_64-linux-gnu")
    (root / "lib64").symlink_to("/lib64")
    (root / "etc").mkdir()
    shutil.copy("/etc/protocols", root / "etc/protocols")
    ddp = root / "lib/firmware/intel/ice/ddp"
    ddp.mkdir(parents=True)
    (ddp / "ice-1.3.41.0.pkg").write_bytes(DDP)
    (ddp / "ice.pkg").symlink_to("ice-1.3.41.0.pkg")  # as Debian ships it
    return root


def _unpack(initrd: bytes, out: Path) -> Path:
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], input=gzip.decompress(initrd), cwd=out, check=True)
    return out


def test_the_initramfs_loads_the_data_nic_drivers_and_carries_ices_ddp(tree: Path, tmp_path: Path) -> None:
    initrd, missing = initramfs(tree, tree / "lib/modules" / KVER)
    unpacked = _unpack(initrd, tmp_path / "initrd")
    loaded = (unpacked / "etc/builder/modules").read_text().split()
    for driver in ("r8169", "igc", "atlantic", "i40e", "ice", "bnxt_en", "mlx5_core", "thunderbolt_net"):
        assert f"{driver}.ko" in loaded, loaded
        assert (unpacked / "lib/modules" / f"{driver}.ko").read_bytes() == f"module {driver}\n".encode()
    # each after what it needs (the init loads them in this order with insmod)
    assert loaded.index("libie.ko") < loaded.index("i40e.ko") and loaded.index("dpll.ko") < loaded.index("ice.ko")
    assert loaded.index("thunderbolt.ko") < loaded.index("thunderbolt_net.ko")
    # ice asks for its DDP package while it probes, in the initramfs: the file itself, not the link
    ddp = unpacked / "lib/firmware/intel/ice/ddp/ice.pkg"
    assert ddp.is_file() and not ddp.is_symlink() and ddp.read_bytes() == DDP
    # a driver this kernel lacks is reported (the set's missing_modules), not fatal
    assert "ixgbe" in missing and "i40e" not in missing


def test_a_kernel_tree_without_the_ddp_still_boots_its_nics(tree: Path, tmp_path: Path) -> None:
    shutil.rmtree(tree / "lib/firmware")
    initrd, _ = initramfs(tree, tree / "lib/modules" / KVER)
    unpacked = _unpack(initrd, tmp_path / "initrd")
    assert "ice.ko" in (unpacked / "etc/builder/modules").read_text().split()
    assert not (unpacked / "lib/firmware").exists()


@pytest.mark.parametrize("rdma", [True, False])
def test_the_root_of_an_rdma_image_loads_the_rdma_drivers_of_the_data_nics(tree: Path, tmp_path: Path,
                                                                          rdma: bool) -> None:
    root = tmp_path / "root"
    root.mkdir()
    spec = KernelSpec("trixie", (6, 12), "test")
    missing = _add_node_files(root, tree, KVER, spec, (), rdma=rdma)
    listed = (root / "usr/lib/builder/modules.load").read_text().split()
    if not rdma:
        assert listed == [] and missing == []
        return
    for module in ("ib_uverbs.ko", "rdma_ucm.ko", "mlx5_ib.ko", "irdma.ko"):
        assert module in listed and (root / "lib/modules" / module).is_file()
    assert listed.index("ib_core.ko") < listed.index("ib_uverbs.ko") < listed.index("mlx5_ib.ko")
    assert "rdma_rxe.ko" not in listed  # soft-RoCE is not for the data network
    assert missing == ["bnxt_re"]  # reported in the set's manifest
